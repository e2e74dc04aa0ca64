"""Deleting what the keeper holds of a VM: its stored state, or the VM's whole TPM.

Both are refused while the VM is placed on a host: a running guest keeps writing state, and
deleting under it would leave a host whose writes the store must refuse forever.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from keeper_shared.messages.envelope import Payload
from keeper_shared.messages.snapshot import SnapshotId
from keeper_shared.messages.types import StateKind, VmId

REASON_MAX_LENGTH = 256


class DeleteState(Payload):
    """Command to the store: delete every stored version of the VM's TPM and NVRAM state,
    its snapshots, its TPM secret and its data key (the ciphertext of any copy left
    elsewhere, e.g. in a Redis backup, cannot be opened without that key).

    Replied with ``DeleteStateReply``: how many versions of each kind and how many
    snapshots were deleted. Deleting a VM without state is not an error."""

    message_type = "state.delete"

    vm_id: VmId = Field(description="The VM.")
    reason: str = Field(
        default="", max_length=REASON_MAX_LENGTH, description="Why, for the audit log."
    )


class StateDeleted(Payload):
    """Audit: the store deleted a VM's stored state (see :class:`DeleteState`)."""

    message_type = "state.deleted"

    vm_id: VmId = Field(description="The VM.")
    versions: dict[StateKind, Annotated[int, Field(ge=0)]] = Field(
        description="How many versions of each kind were deleted."
    )
    snapshots: list[SnapshotId] = Field(description="The snapshots deleted with them.")
    requested_by: str | None = Field(
        default=None, max_length=256, description="The bus user who asked (None: unknown)."
    )
    reason: str = Field(default="", max_length=REASON_MAX_LENGTH, description="Why.")


class DisableTpm(Payload):
    """Command to policy: the VM no longer has a keeper-managed TPM. Its stored state is
    deleted (as :class:`DeleteState`) and its registration removed; enabling it again
    starts with a new, empty TPM.

    Replied with ``DisableTpmReply``, the store's deletion counts."""

    message_type = "tpm.disable"

    vm_id: VmId = Field(description="The VM.")
    reason: str = Field(
        default="", max_length=REASON_MAX_LENGTH, description="Why, for the audit log."
    )


class TpmDisabled(Payload):
    """Audit: policy disabled a VM's TPM; its state and registration are gone."""

    message_type = "tpm.disabled"

    vm_id: VmId = Field(description="The VM.")
    requested_by: str | None = Field(
        default=None, max_length=256, description="The bus user who asked (None: unknown)."
    )
    reason: str = Field(default="", max_length=REASON_MAX_LENGTH, description="Why.")
