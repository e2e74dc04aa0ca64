"""``vm.revert``: go back to a snapshot with memory.

A revert is a power-off (when the VM runs) followed by a placement that restores the
snapshot's pinned TPM and NVRAM and then, instead of a fresh start, reverts the domain to
the snapshot with its memory. Both are the existing workflows, so a revert inherits their
bounds, fencing and resumption: the power-off retrieves the final state first (what the
guest sealed since the snapshot stays in the store's history), and the placement raises the
placement epoch (what the reverted guest writes is newer than anything stored, though its
TPM is older). It happens on the snapshot's own host: only that host has the memory file.
"""

from __future__ import annotations

from dataclasses import dataclass

import structlog

from keeper_policy.placement.placer import Placer
from keeper_policy.snapshot.memory_records import MemorySnapshot, MemorySnapshots
from keeper_policy.stop.stopper import Stopper
from keeper_policy.storage.vm_registry import PolicyRegistry, UnknownVmError
from keeper_shared.messages.placement import PlaceVm, StopMode, StopVm
from keeper_shared.messages.replies import RevertVmReply
from keeper_shared.messages.vm_snapshot import RevertVm

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class RevertPlan:
    """What a revert does: power the VM off first or not, then this placement."""

    stop_first: bool
    place: PlaceVm


def plan_revert(
    request: RevertVm, snapshot: MemorySnapshot | None, running_on: str | None
) -> RevertPlan | str:
    """The plan, or why there is none. A snapshot the store pinned without memory is not
    one to revert to (it is restored with ``vm.place`` and its ``snapshot_id``)."""
    if snapshot is None:
        return (
            f"the VM has no snapshot with memory named {request.snapshot_id} (a snapshot "
            "without memory is restored with a start from it: `keeper vm restore --snapshot`)"
        )
    return RevertPlan(
        stop_first=running_on is not None,
        place=PlaceVm(
            vm_id=request.vm_id,
            host=snapshot.host,
            snapshot_id=snapshot.snapshot_id,
            # The snapshot's versions are older than the newest: that is the point.
            allow_older=True,
        ),
    )


class Reverter:
    """Carries out ``vm.revert``."""

    def __init__(
        self,
        registry: PolicyRegistry,
        records: MemorySnapshots,
        stopper: Stopper,
        placer: Placer,
    ) -> None:
        self._registry = registry
        self._records = records
        self._stopper = stopper
        self._placer = placer

    async def revert(self, request: RevertVm) -> RevertVmReply:
        """Power off when running, then place with the revert; the reply says where and
        under which epoch the VM runs again, or why not."""
        vm_id = request.vm_id
        try:
            vm = await self._registry.vm(vm_id)
        except UnknownVmError as error:
            return _refused(request, str(error))
        snapshot = await self._records.get(vm_id, request.snapshot_id)
        plan = plan_revert(request, snapshot, vm.host)
        if isinstance(plan, str):
            return _refused(request, plan)
        assert snapshot is not None
        if plan.stop_first:
            stopped = await self._stopper.stop(StopVm(vm_id=vm_id, mode=StopMode.POWEROFF))
            if not stopped.ok:
                return _refused(request, f"the VM could not be powered off: {stopped.error}")
        placed = await self._placer.place(plan.place, revert_to=snapshot)
        if not placed.ok:
            # An undone placement leaves the VM off, its newest state untouched.
            why = f"{placed.error}; the VM is off (a start uses its newest state)"
            return _refused(request, why, timed_out=placed.timed_out)
        log.info(
            "VM reverted to a snapshot with memory",
            vm_id=vm_id,
            snapshot_id=request.snapshot_id,
            host=snapshot.host,
            epoch=placed.epoch,
        )
        return RevertVmReply(
            ok=True,
            snapshot_id=request.snapshot_id,
            host=snapshot.host,
            epoch=placed.epoch,
            versions=placed.versions,
        )


def _refused(request: RevertVm, why: str, *, timed_out: bool = False) -> RevertVmReply:
    return RevertVmReply.failed(f"revert to {request.snapshot_id}: {why}", timed_out=timed_out)
