"""Policy workflows survive their policy replica being SIGKILLed, with the real services as
processes:

- a stop survives its replica being killed mid-retrieval: the workflow's progress is in
  Redis, another replica takes its lease over when it expires and resumes at the recorded
  step (the attempt already made counts), and the client still gets its answer (its
  request is redelivered to the new replica, which joins the workflow);
- a placement survives its replica being killed at its restore step: the new replica
  resumes it under the epoch it already had.

Both tests run on one stack of this module's (no other test's stack may run beside it on
the shared service queues): each kills the replica that runs and starts the next.
Live migration and encrypted or stranded TPM state are in
``shared_stack/test_policy_migration_and_secrets.py``, the older swtpm in
``configured_hosts/test_policy_swtpm_version.py``.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from keeper_devtools.localstack.redis_users import RedisUsers
from keeper_policy.storage.keys import workflow_key
from keeper_shared.messages.placement import StopMode, VmPlaced
from keeper_shared.messages.state import StatePersisted
from keeper_shared.redis_access.results import awaited
from support.broker import Broker
from support.policy_stack import STEP_TIMEOUT_S, PolicyStack
from support.waiting import wait_until

pytestmark = [
    pytest.mark.rabbit,
    pytest.mark.redis,
    pytest.mark.libvirt,
    pytest.mark.asyncio(loop_scope="module"),
]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(
    rabbitmq_broker: Broker,
    redis_url: str,
    redis_users: RedisUsers,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[PolicyStack]:
    async with PolicyStack(
        rabbitmq_broker, redis_url, tmp_path_factory.mktemp("workflows"), redis_users=redis_users
    ) as running:
        yield running


async def kill_the_running_replica(stack: PolicyStack) -> int:
    """SIGKILL the one policy replica that runs (its index is returned) and reap it."""
    (index,) = [
        int(name.removeprefix("policy-"))
        for name, service in stack.services.items()
        if name.startswith("policy-") and service.running
    ]
    stack.signal(f"policy-{index}", signal.SIGKILL)
    await stack.services[f"policy-{index}"].stop()
    return index


async def start_replica(stack: PolicyStack, index: int) -> str:
    """Start a new policy replica ``policy-<index>``; returns its name."""
    name = f"policy-{index}"
    stack.services[name] = stack.policy_process(index)
    await stack.services[name].start()
    return name


async def test_a_stop_survives_its_policy_replica_being_killed(stack: PolicyStack) -> None:
    spec = await stack.new_vm("a")
    await stack.write_tpm_persisted("a", spec.vm_id)
    stack.signal("a", signal.SIGSTOP)  # retrievals hang until the host is thawed
    try:
        final = stack.write_tpm("a", spec.vm_id)
        stopping = asyncio.create_task(stack.client.stop_vm(spec.vm_id, StopMode.POWEROFF))

        async def retrieving() -> bool:
            attempts = await awaited(stack.redis.hget(workflow_key(spec.vm_id), "attempts"))
            return attempts is not None and int(attempts) >= 1

        await wait_until(retrieving, "the first retrieval attempt to be recorded")
        killed = await kill_the_running_replica(stack)
    finally:
        stack.signal("a", signal.SIGCONT)  # the next test needs the host
    assert await awaited(stack.redis.exists(workflow_key(spec.vm_id)))  # left mid-way

    replica = await start_replica(stack, killed + 1)
    detail = await asyncio.wait_for(stopping, STEP_TIMEOUT_S)

    assert detail.retrieved
    assert detail.attempts >= 2  # the killed replica's attempt was counted
    await stack.events.wait_for(
        StatePersisted,
        lambda e: e.vm_id == spec.vm_id and e.content_hash == final,
    )
    assert not await awaited(stack.redis.exists(workflow_key(spec.vm_id)))
    assert not stack.hosts["a"].tpm_dir(spec.vm_id).exists()
    resumed = stack.services[replica].log_path.read_text()
    assert "workflow running" in resumed
    assert spec.vm_id in resumed


async def test_a_placement_survives_its_policy_replica_being_killed(stack: PolicyStack) -> None:
    spec = await stack.new_vm("a")
    sealed = await stack.write_tpm_persisted("a", spec.vm_id)
    await stack.client.stop_vm(spec.vm_id, StopMode.SHUTDOWN)
    stack.signal("b", signal.SIGSTOP)  # the prepare on b hangs until it is thawed
    try:
        placing = asyncio.create_task(stack.client.place(spec.vm_id, stack.host_id("b")))

        async def restoring() -> bool:
            step: object = await awaited(stack.redis.hget(workflow_key(spec.vm_id), "step"))
            return step == b"restore"

        await wait_until(restoring, "the placement to reach its restore step")
        killed = await kill_the_running_replica(stack)
    finally:
        stack.signal("b", signal.SIGCONT)  # the next test needs the host
    assert await stack.placement(spec.vm_id) == (stack.host_id("b"), 2)  # fenced already

    await start_replica(stack, killed + 1)
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
