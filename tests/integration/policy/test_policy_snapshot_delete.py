"""Deleting a snapshot with memory through policy, with the real services as processes: the
memory file on the snapshot's host goes first (it is the guest's whole memory), then
policy's record and the store's pin. While the host does not answer, nothing is deleted.
A snapshot without memory is the store's pin only. Deleting the VM's state deletes the
memory of every snapshot it had; a host declared lost cannot be asked, and the reply names
it."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from keeper_devtools.localstack.redis_users import RedisUsers
from keeper_shared.keeper_client.client import KeeperRequestError
from keeper_shared.messages.host_loss import HostLost
from keeper_shared.messages.placement import StopMode
from keeper_shared.messages.vm_snapshot import SnapshotMode
from support.broker import Broker
from support.policy_stack import PolicyStack
from support.waiting import wait_until

pytestmark = [pytest.mark.rabbit, pytest.mark.redis, pytest.mark.libvirt]


def memory_file(stack: PolicyStack, host: str, vm_id: str, snapshot_id: str) -> Path:
    """Where the host keeps the snapshot's memory. The test driver's domains have no QEMU
    to write it, so the test puts a file there as QEMU would."""
    path = stack.hosts[host].snapshot_dir / vm_id / f"{snapshot_id}.mem"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"guest memory")
    return path


async def snapshot_names(stack: PolicyStack, vm_id: str) -> list[str]:
    return [info.snapshot_id for info in await stack.client.list_snapshots(vm_id)]


async def test_a_snapshot_with_memory_is_deleted_on_its_host_first(
    rabbitmq_broker: Broker, redis_url: str, redis_users: RedisUsers, tmp_path: Path
) -> None:
    async with PolicyStack(rabbitmq_broker, redis_url, tmp_path, redis_users=redis_users) as stack:
        spec = await stack.new_vm("a")
        vm_id = spec.vm_id
        await stack.write_tpm_persisted("a", vm_id)
        taken = await stack.client.snapshot(vm_id, "before-upgrade", memory=True)
        assert taken.mode is SnapshotMode.MEMORY
        await stack.client.snapshot(vm_id, "live-1")
        memory = memory_file(stack, "a", vm_id, "before-upgrade")

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


async def test_deleting_a_vms_state_deletes_the_memory_of_its_snapshots(
    rabbitmq_broker: Broker, redis_url: str, redis_users: RedisUsers, tmp_path: Path
) -> None:
    async with PolicyStack(rabbitmq_broker, redis_url, tmp_path, redis_users=redis_users) as stack:
        spec = await stack.new_vm("a")
        vm_id = spec.vm_id
        await stack.write_tpm_persisted("a", vm_id)
        await stack.client.snapshot(vm_id, "s1", memory=True)
        await stack.client.snapshot(vm_id, "s2", memory=True)
        memories = [memory_file(stack, "a", vm_id, name) for name in ("s1", "s2")]
        assert (await stack.client.stop_vm(vm_id, StopMode.SHUTDOWN)).removed

        await stack.client.delete_state(vm_id, reason="test")

        await wait_until(
            lambda: not any(path.exists() for path in memories),
            "the snapshots' memory files to be deleted on their host",
        )
        assert not memories[0].parent.exists(), "the VM's memory directory is left behind"


async def test_a_lost_hosts_snapshot_is_deleted_and_the_reply_names_the_host(
    rabbitmq_broker: Broker, redis_url: str, redis_users: RedisUsers, tmp_path: Path
) -> None:
    async with PolicyStack(
        rabbitmq_broker,
        redis_url,
        tmp_path,
        redis_users=redis_users,
        policy_env={"KEEPER_POLICY_HOST_LOST_AFTER_S": "3"},
    ) as stack:
        spec = await stack.new_vm("a")
        vm_id, host_a = spec.vm_id, stack.host_id("a")
        await stack.write_tpm_persisted("a", vm_id)
        await stack.client.snapshot(vm_id, "s1", memory=True)
        memory = memory_file(stack, "a", vm_id, "s1")
        assert (await stack.client.stop_vm(vm_id, StopMode.SHUTDOWN)).removed
        stack.signal("a", signal.SIGKILL)
        await stack.services["a"].stop()
        await stack.events.wait_for(HostLost, lambda e: e.host == host_a)

        deleted = await stack.client.delete_snapshot(vm_id, "s1")

        assert deleted.deleted
        assert (deleted.memory_deleted_on, deleted.memory_left_on) == (None, host_a)
        assert memory.is_file(), "nobody could have deleted it: its host is down"
        assert await snapshot_names(stack, vm_id) == []
