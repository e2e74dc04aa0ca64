"""The rules of ``vm.revert``: only a snapshot with memory policy recorded can be gone back
to; it happens on the host that holds the memory, with the snapshot's pinned (older) state;
a running VM is powered off first."""

from __future__ import annotations

from keeper_policy.snapshot.memory_records import MemorySnapshot
from keeper_policy.snapshot.reverter import RevertPlan, plan_revert
from keeper_shared.messages.placement import PlaceVm
from keeper_shared.messages.vm_snapshot import RevertVm

VM_ID = "6b2f7e0a-3c1d-4d6e-9a8b-1c2d3e4f5a6b"
REQUEST = RevertVm(vm_id=VM_ID, snapshot_id="before-update")
SNAPSHOT = MemorySnapshot(
    snapshot_id="before-update", host="host-a", snapshot_xml="<domainsnapshot/>"
)


def test_a_snapshot_without_memory_is_refused_and_the_restore_named() -> None:
    refusal = plan_revert(REQUEST, None, running_on="host-a")
    assert isinstance(refusal, str)
    assert "no snapshot with memory named before-update" in refusal
    assert "keeper vm restore --snapshot" in refusal


def test_a_stopped_vm_is_placed_on_the_snapshots_host_with_its_pinned_state() -> None:
    plan = plan_revert(REQUEST, SNAPSHOT, running_on=None)
    assert plan == RevertPlan(
        stop_first=False,
        place=PlaceVm(vm_id=VM_ID, host="host-a", snapshot_id="before-update", allow_older=True),
    )


def test_a_running_vm_is_powered_off_first_wherever_it_runs() -> None:
    plan = plan_revert(REQUEST, SNAPSHOT, running_on="host-b")
    assert isinstance(plan, RevertPlan)
    assert plan.stop_first
    assert plan.place.host == "host-a", "the memory file is on the snapshot's host"
