"""Deleting a snapshot with memory through policy, with the real services as processes: the
memory file on the snapshot's host goes first (it is the guest's whole memory), then
policy's record and the store's pin. While the host does not answer, nothing is deleted.
A snapshot without memory is the store's pin only. Deleting the VM's state deletes the
memory of every snapshot it had. (A lost host's: ``../test_policy_snapshot_host_lost.py``.)"""

from __future__ import annotations

import signal

import pytest

from keeper_shared.keeper_client.client import KeeperRequestError
from keeper_shared.messages.placement import StopMode
from keeper_shared.messages.vm_snapshot import SnapshotMode
from support.policy_stack import PolicyStack
from support.snapshot_files import plant_memory_file, snapshot_names
from support.waiting import wait_until

pytestmark = [
    pytest.mark.rabbit,
    pytest.mark.redis,
    pytest.mark.libvirt,
    pytest.mark.asyncio(loop_scope="package"),
]


async def test_a_snapshot_with_memory_is_deleted_on_its_host_first(stack: PolicyStack) -> None:
    spec = await stack.new_vm("a")
    vm_id = spec.vm_id
    await stack.write_tpm_persisted("a", vm_id)
    taken = await stack.client.snapshot(vm_id, "before-upgrade", memory=True)
    assert taken.mode is SnapshotMode.MEMORY
    await stack.client.snapshot(vm_id, "live-1")
    memory = plant_memory_file(stack, "a", vm_id, "before-upgrade")

    # The host does not answer: refused, and the snapshot is whole (file, pin, record).
    stack.signal("a", signal.SIGSTOP)
    try:
        with pytest.raises(KeeperRequestError, match="nothing was deleted"):
            await stack.client.delete_snapshot(vm_id, "before-upgrade")
    finally:
        stack.signal("a", signal.SIGCONT)
    assert memory.is_file()
    assert "before-upgrade" in await snapshot_names(stack, vm_id)

    deleted = await stack.client.delete_snapshot(vm_id, "before-upgrade")
    assert deleted.deleted
    assert deleted.memory_deleted_on == stack.host_id("a")
    assert deleted.memory_left_on is None
    assert not memory.exists()
    assert await snapshot_names(stack, vm_id) == ["live-1"]
    with pytest.raises(KeeperRequestError, match="no snapshot with memory"):
        await stack.client.revert(vm_id, "before-upgrade")

    # Again: nothing left to delete, and that is not an error.
    again = await stack.client.delete_snapshot(vm_id, "before-upgrade")
    assert not again.deleted
    assert again.memory_deleted_on is None

    # Without memory: the store's pin only.
    live = await stack.client.delete_snapshot(vm_id, "live-1")
    assert live.deleted
    assert live.memory_deleted_on is None
    assert await snapshot_names(stack, vm_id) == []
    await stack.client.stop_vm(vm_id, StopMode.POWEROFF)


async def test_deleting_a_vms_state_deletes_the_memory_of_its_snapshots(stack: PolicyStack) -> None:
    spec = await stack.new_vm("a")
    vm_id = spec.vm_id
    await stack.write_tpm_persisted("a", vm_id)
    await stack.client.snapshot(vm_id, "s1", memory=True)
    await stack.client.snapshot(vm_id, "s2", memory=True)
    memories = [plant_memory_file(stack, "a", vm_id, name) for name in ("s1", "s2")]
    assert (await stack.client.stop_vm(vm_id, StopMode.SHUTDOWN)).removed

    await stack.client.delete_state(vm_id, reason="test")

    await wait_until(
        lambda: not any(path.exists() for path in memories),
        "the snapshots' memory files to be deleted on their host",
    )
    assert not memories[0].parent.exists(), "the VM's memory directory is left behind"
