"""Policy workflows with the real services as processes, each test on a stack of its own
(it kills a replica or runs a host with another swtpm):

- a stop survives its policy replica being SIGKILLed mid-retrieval: the workflow's progress
  is in Redis, another replica takes its lease over when it expires and resumes at the
  recorded step (the attempt already made counts), and the client still gets its answer
  (its request is redelivered to the new replica, which joins the workflow);
- a placement survives its policy replica being SIGKILLed at its restore step: the new
  replica resumes it under the epoch it already had;
- a VM is not placed on a host whose swtpm is older than the one that last ran it (that
  host runs a ``swtpm`` reporting an older version), unless the placement overrides it.

Live migration and encrypted or stranded TPM state, which need no stack of their own, are
in ``shared_stack/test_policy_migration_and_secrets.py``.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
from pathlib import Path

import pytest

from keeper_devtools.localstack.redis_users import RedisUsers
from keeper_policy.storage.keys import workflow_key
from keeper_shared.keeper_client.client import KeeperRequestError
from keeper_shared.messages.placement import StopMode, VmPlaced
from keeper_shared.messages.state import (
    StatePersisted,
)
from keeper_shared.redis_access.results import awaited
from support.broker import Broker
from support.policy_stack import STEP_TIMEOUT_S, PolicyStack
from support.waiting import wait_until

pytestmark = [pytest.mark.rabbit, pytest.mark.redis, pytest.mark.libvirt]


async def test_a_stop_survives_its_policy_replica_being_killed(
    rabbitmq_broker: Broker, redis_url: str, redis_users: RedisUsers, tmp_path: Path
) -> None:
    async with PolicyStack(rabbitmq_broker, redis_url, tmp_path, redis_users=redis_users) as stack:
        spec = await stack.new_vm("a")
        await stack.write_tpm_persisted("a", spec.vm_id)
        stack.signal("a", signal.SIGSTOP)  # retrievals hang until the host is thawed
        final = stack.write_tpm("a", spec.vm_id)
        stopping = asyncio.create_task(stack.client.stop_vm(spec.vm_id, StopMode.POWEROFF))

        async def retrieving() -> bool:
            attempts = await awaited(stack.redis.hget(workflow_key(spec.vm_id), "attempts"))
            return attempts is not None and int(attempts) >= 1

        await wait_until(retrieving, "the first retrieval attempt to be recorded")
        stack.signal("policy-0", signal.SIGKILL)
        await stack.services["policy-0"].stop()
        stack.signal("a", signal.SIGCONT)
        assert await awaited(stack.redis.exists(workflow_key(spec.vm_id)))  # left mid-way

        stack.services["policy-1"] = stack.policy_process(1)
        await stack.services["policy-1"].start()
        detail = await asyncio.wait_for(stopping, STEP_TIMEOUT_S)

        assert detail.retrieved
        assert detail.attempts >= 2  # the killed replica's attempt was counted
        await stack.events.wait_for(
            StatePersisted,
            lambda e: e.vm_id == spec.vm_id and e.content_hash == final,
        )
        assert not await awaited(stack.redis.exists(workflow_key(spec.vm_id)))
        assert not stack.hosts["a"].tpm_dir(spec.vm_id).exists()
        resumed = stack.services["policy-1"].log_path.read_text()
        assert "workflow running" in resumed
        assert spec.vm_id in resumed


async def test_an_older_swtpm_is_refused_unless_overridden(
    rabbitmq_broker: Broker, redis_url: str, redis_users: RedisUsers, tmp_path: Path
) -> None:
    fake_bin = tmp_path / "old-swtpm-bin"
    fake_bin.mkdir()
    fake = fake_bin / "swtpm"
    fake.write_text("#!/bin/sh\necho 'TPM emulator version 0.6.0, Copyright (c) IBM Corp.'\n")
    fake.chmod(0o755)
    real = shutil.which("swtpm")
    if real is None:
        pytest.skip("swtpm is not installed")
    async with PolicyStack(
        rabbitmq_broker,
        redis_url,
        tmp_path / "stack",
        redis_users=redis_users,
        agent_env={"b": {"PATH": f"{fake_bin}:{Path(real).parent}:/usr/bin:/bin"}},
    ) as stack:
        spec = await stack.new_vm("a")  # a runs the installed swtpm
        host_a, host_b = stack.host_id("a"), stack.host_id("b")
        first = await stack.events.wait_for(VmPlaced, lambda e: e.vm_id == spec.vm_id)
        newer = first.data.swtpm_version
        assert newer is not None
        await stack.write_tpm_persisted("a", spec.vm_id)
        await stack.client.stop_vm(spec.vm_id, StopMode.SHUTDOWN)

        with pytest.raises(KeeperRequestError) as refused:
            await stack.client.place(spec.vm_id, host_b)
        assert str(refused.value) == (
            f"host {host_b} runs swtpm 0.6.0, older than swtpm {newer} that last wrote this "
            f"VM's state (on {host_a}); place with override_version to allow it"
        )
        assert await stack.placement(spec.vm_id) == ("", 1)  # nothing happened

        detail = await stack.client.place(spec.vm_id, host_b, override_version=True)
        assert "older than swtpm" in (detail.version_overridden or "")
        placed = await stack.events.wait_for(
            VmPlaced, lambda e: e.vm_id == spec.vm_id and e.host == host_b
        )
        assert placed.data.swtpm_version == "0.6.0"
        assert placed.data.version_overridden is not None
        await stack.client.stop_vm(spec.vm_id, StopMode.POWEROFF)
        # Back to the newer swtpm is always fine.
        await stack.client.place(spec.vm_id, host_a)
        await stack.client.stop_vm(spec.vm_id, StopMode.POWEROFF)


async def test_a_placement_survives_its_policy_replica_being_killed(
    rabbitmq_broker: Broker, redis_url: str, redis_users: RedisUsers, tmp_path: Path
) -> None:
    async with PolicyStack(rabbitmq_broker, redis_url, tmp_path, redis_users=redis_users) as stack:
        spec = await stack.new_vm("a")
        sealed = await stack.write_tpm_persisted("a", spec.vm_id)
        await stack.client.stop_vm(spec.vm_id, StopMode.SHUTDOWN)
        stack.signal("b", signal.SIGSTOP)  # the prepare on b hangs until it is thawed
        placing = asyncio.create_task(stack.client.place(spec.vm_id, stack.host_id("b")))

        async def restoring() -> bool:
            step: object = await awaited(stack.redis.hget(workflow_key(spec.vm_id), "step"))
            return step == b"restore"

        await wait_until(restoring, "the placement to reach its restore step")
        stack.signal("policy-0", signal.SIGKILL)
        await stack.services["policy-0"].stop()
        stack.signal("b", signal.SIGCONT)
        assert await stack.placement(spec.vm_id) == (stack.host_id("b"), 2)  # fenced already

        stack.services["policy-1"] = stack.policy_process(1)
        await stack.services["policy-1"].start()
        detail = await asyncio.wait_for(placing, STEP_TIMEOUT_S)

        assert detail.epoch == 2  # resumed under the epoch it had, not a third one
        assert stack.hosts["b"].tpm_state_hash(spec.vm_id) == sealed
        placed = stack.events.matching(VmPlaced, lambda e: e.vm_id == spec.vm_id)
        assert [(e.data.host, e.data.epoch) for e in placed] == [
            (stack.host_id("a"), 1),
            (stack.host_id("b"), 2),
        ]
        assert not await awaited(stack.redis.exists(workflow_key(spec.vm_id)))
        stopped = await stack.client.stop_vm(spec.vm_id, StopMode.POWEROFF)
        assert stopped.retrieved
