"""Which stored version of each kind a restore sends, and whether it may.

Newest by default (for a TPM whose reset is pending, the newest version of the VM's own
TPM: invariant 10); a version named per kind, or a snapshot's pins, when asked. Sending a
version older than the newest rolls the VM's TPM back (sealed secrets and counters with it),
so it is refused unless the request says ``allow_older``, and the refusal names both
versions so the person asking sees what they would lose.
"""

from __future__ import annotations

from keeper_shared.messages.state import RestoreState
from keeper_shared.messages.types import StateKind
from keeper_state_store.storage.repository import StateRepository
from keeper_state_store.storage.snapshots import SnapshotStore


class RestoreRefusedError(ValueError):
    """The restore cannot or may not be carried out as asked; the message says why."""


async def plan_restore(
    request: RestoreState, repository: StateRepository, snapshots: SnapshotStore
) -> dict[StateKind, int]:
    """The version to send per kind (kinds with nothing to send are left out)."""
    heads = await repository.trust.restorable_versions(request.vm_id)
    pending = await repository.trust.pending_reset(request.vm_id)
    if request.snapshot_id is not None:
        snapshot = await snapshots.get(request.vm_id, request.snapshot_id)
        if snapshot is None:
            raise RestoreRefusedError(f"VM {request.vm_id} has no snapshot {request.snapshot_id!r}")
        chosen = dict(snapshot.versions)
    else:
        chosen = {**heads, **(request.versions or {})}
    for kind, version in chosen.items():
        head = heads.get(kind)
        if kind is StateKind.TPM and pending is not None and head is not None and version > head:
            raise RestoreRefusedError(
                f"tpm version {version} of {request.vm_id} is not the VM's own TPM: another "
                f"TPM replaced it from version {pending.reset_version} on and was not "
                f"accepted (`keeper vm accept-tpm` makes it the VM's own); version {head} "
                "is the newest of its own"
            )
        if head is None or version > head:
            raise RestoreRefusedError(f"{kind} version {version} of {request.vm_id} is not stored")
        if version < head and not request.allow_older:
            raise RestoreRefusedError(
                f"refusing to restore {kind} version {version} of {request.vm_id} over the "
                f"newer version {head}: set allow_older to roll the state back"
            )
    return chosen
