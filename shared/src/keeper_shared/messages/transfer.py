"""State that leaves its VM: clones to another VM, export to a bundle, import from one.

All three commands go to the state store. A clone or an import lands as version 1 of a VM
that has no stored state yet, under fencing token (0, 0), so the first real write of that VM
(epoch >= 1) is newer.
"""

from __future__ import annotations

import enum

from pydantic import Field

from keeper_shared.messages.envelope import Payload
from keeper_shared.messages.sealed import SealedBlob
from keeper_shared.messages.types import SecretBlob, VmId

MIN_PASSPHRASE_CHARS = 8
MAX_PASSPHRASE_CHARS = 1024
"""Bounds of a bundle passphrase, checked by the client before sealing it and by the store
after opening it."""


class CloneTpm(enum.StrEnum):
    """What a clone gets for its TPM."""

    COPY = "copy"
    """The source's TPM and NVRAM: the same TPM identity (endorsement key, sealed data)."""
    FRESH = "fresh"
    """Only the NVRAM (Secure Boot keys); the TPM is manufactured anew on first start."""


class CloneVm(Payload):
    """Command to the store: give a VM without stored state a copy of another VM's state.

    The copy is re-encrypted under the target's data key and bound to the target's id.
    Replied with ``CloneVmReply``: each stored kind's version; refused
    when the target already has stored state (a repeat of the same clone is a no-op)."""

    message_type = "vm.clone"

    source_vm_id: VmId = Field(description="The VM whose newest state is copied.")
    target_vm_id: VmId = Field(description="The new VM; must have no stored state.")
    tpm: CloneTpm = Field(description="Copy the TPM, or leave the target a fresh one.")


class ExportState(Payload):
    """Command to the store: write a VM's newest state into one portable, encrypted bundle.

    Replied with :class:`StateExported`."""

    message_type = "state.export"
    schema_version = 2

    vm_id: VmId = Field(description="The VM to export.")
    passphrase: SealedBlob = Field(
        description="Protects the bundle (scrypt, AES-256-GCM); sealed to the store's key "
        "and bound to the VM (v1 carried it in clear and is refused)."
    )


class StateExported(Payload):
    """Reply to :class:`ExportState`: the bundle, or why there is none."""

    message_type = "state.exported"

    vm_id: VmId = Field(description="The exported VM.")
    bundle: SecretBlob | None = Field(
        default=None,
        description="The bundle file's bytes, encrypted with the passphrase.",
    )
    error: str | None = Field(default=None, description="Why the export failed; None if not.")


class ImportState(Payload):
    """Command to the store: verify a bundle completely, then store its state for a VM that
    has none.

    Replied with ``ImportStateReply``: ``vm_id`` and each stored kind's version."""

    message_type = "state.import"
    schema_version = 2

    bundle: SecretBlob = Field(description="The bundle file's bytes.")
    passphrase: SealedBlob = Field(
        description="The passphrase the bundle was exported with, sealed to the store's key "
        "and bound to the bundle's hash and the target (v1 carried it in clear and is refused)."
    )
    target_vm_id: VmId | None = Field(
        default=None, description="The VM to store it for; default the bundle's own VM."
    )
