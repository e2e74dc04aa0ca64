"""Reading a VM's newest state to move it (its own TPM's, while a reset is pending), and
storing moved state as a VM's first state.

Clones and imports are a VM's first state: stored as version 1 under token (0, 0), only if
the VM has no stored state at all (persist_initial.lua), so they can never overwrite what a
host wrote. The VM id is bound into every ciphertext's AAD, so state moving to another VM is
always decrypted, verified and sealed again under the target's key and binding; a plain copy
of the bytes would not decrypt.
"""

from __future__ import annotations

from keeper_shared.messages.state import VersionOrigin
from keeper_shared.messages.types import StateBlob, StateKind
from keeper_state_store.crypto.sealing import BlobSealer
from keeper_state_store.storage.repository import (
    INITIAL_TOKEN,
    InitialOutcome,
    InitialVersion,
    StateRepository,
)
from keeper_state_store.storage.version_reader import VerifiedVersion, VersionReader


async def read_newest(
    repository: StateRepository, reader: VersionReader, vm_id: str, kinds: list[StateKind]
) -> dict[StateKind, VerifiedVersion]:
    """The newest version of each of ``kinds`` the VM has, verified (kinds it has none of
    are left out); for a TPM whose reset is pending, the newest version of the VM's own TPM
    (see `keeper_state_store.storage.tpm_trust`). Raises as `VersionReader.read` does."""
    restorable = await repository.trust.restorable_versions(vm_id)
    return {
        kind: await reader.read(vm_id, kind, restorable[kind])
        for kind in kinds
        if kind in restorable
    }


async def store_first_state(
    repository: StateRepository,
    sealer: BlobSealer,
    target: str,
    blobs: dict[StateKind, StateBlob],
    *,
    origin: VersionOrigin,
    source_vm_id: str,
    tpm_identity: str = "",
) -> InitialOutcome:
    """Seal ``blobs`` for ``target`` under the initial token and store them as its version 1,
    unless it has state already. ``tpm_identity``: the copied TPM's fingerprint ('' when
    unread), which becomes the target's own."""
    versions = {}
    for kind, blob in blobs.items():
        # Re-bound to the target and to the initial token: the AAD names both.
        rebound = blob.model_copy(update={"token": INITIAL_TOKEN})
        versions[kind] = InitialVersion(
            content_hash=blob.content_hash,
            size=blob.size,
            sealed=await sealer.seal(target, rebound),
            identity=tpm_identity if kind is StateKind.TPM else "",
        )
    return await repository.write_initial(
        target, versions, origin=origin, source_vm_id=source_vm_id
    )
