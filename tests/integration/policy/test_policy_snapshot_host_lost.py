"""Deleting a snapshot whose host was declared lost, with the real services as processes:
the host cannot be asked to delete the snapshot's memory file, so the snapshot is deleted
and the reply names the host that still holds the file. Its own stack: the test kills an
agent and needs a short loss bound (the others are in ``shared_stack/``)."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from keeper_devtools.localstack.redis_users import RedisUsers
from keeper_shared.messages.host_loss import HostLost
from keeper_shared.messages.placement import StopMode
from support.broker import Broker
from support.policy_stack import PolicyStack
from support.snapshot_files import plant_memory_file, snapshot_names

pytestmark = [pytest.mark.rabbit, pytest.mark.redis, pytest.mark.libvirt]


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
        memory = plant_memory_file(stack, "a", vm_id, "s1")
        assert (await stack.client.stop_vm(vm_id, StopMode.SHUTDOWN)).removed
        stack.signal("a", signal.SIGKILL)
        await stack.services["a"].stop()
        await stack.events.wait_for(HostLost, lambda e: e.host == host_a)

        deleted = await stack.client.delete_snapshot(vm_id, "s1")

        assert deleted.deleted
        assert (deleted.memory_deleted_on, deleted.memory_left_on) == (None, host_a)
        assert memory.is_file(), "nobody could have deleted it: its host is down"
        assert await snapshot_names(stack, vm_id) == []
