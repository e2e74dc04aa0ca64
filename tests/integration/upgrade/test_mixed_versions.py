"""Releases N and N-1 side by side, every service a real process, under load.

The previous release is extracted from this repository's history (its recorded commit) and
run from the same venv with ``PYTHONPATH`` pointing at its sources. Both halves of a rolling
upgrade:

- store and policy upgraded first, hosts not yet: the NEW store and policy beside an OLD
  host agent (and a new one). They learn from its heartbeats which release it reads and
  send its commands at those versions;
- the reverse, as when an upgrade is rolled back or a new host joins an old cluster: a NEW
  agent, capped with ``KEEPER_UPGRADE_LEVEL=0.1.0``, beside the OLD store and policy (and an
  old agent). Without the cap its heartbeats are dead-lettered and it looks lost.

Each run places VMs on both hosts, changes their TPM and NVRAM for a few seconds, then stops
every VM (its final state retrieved) and starts it on the other host (its state prepared
there by the other release). It proves: no message dead-lettered (no dead-letter queue grew,
no service logged a refusal), no acknowledged state lost (every announced version is what
Redis holds, the history is in order, every VM's newest content is the head and is what the
other host receives), and every start and stop worked.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

import pytest

from chaos.harness import (
    ChaosCluster,
    ChaosVm,
    ClusterConfig,
    StateLoad,
    analyse,
    wait_until_stored,
)
from keeper_shared.bus.topology import (
    POLICY_COMMANDS,
    POLICY_EVENTS,
    POLICY_HOST_REQUESTS,
    STATE_STORE_COMMANDS,
    STATE_STORE_EVENTS,
    STATE_STORE_HOST_REQUESTS,
    QueueSpec,
    host_command_queue,
)
from keeper_shared.messages.placement import StopMode
from keeper_shared.messages.types import StateKind
from keeper_shared.state_format.blobs import content_hash
from support.released_tree import ReleasedTree

pytestmark = [pytest.mark.rabbit, pytest.mark.redis, pytest.mark.libvirt]

VMS_PER_HOST = 2
LOAD_S = 4.0
CHANGE_INTERVAL_S = 0.3
SETTLE_TIMEOUT_S = 60.0
"""Generous: a hang fails the test, slowness does not."""
SERVICE_QUEUES = (
    STATE_STORE_EVENTS,
    STATE_STORE_COMMANDS,
    STATE_STORE_HOST_REQUESTS,
    POLICY_EVENTS,
    POLICY_COMMANDS,
    POLICY_HOST_REQUESTS,
)
REFUSAL_LOG = "message refused, dead-lettered"


async def test_new_store_and_policy_serve_an_old_host_agent_under_load(
    rabbitmq_url: str, redis_url: str, tmp_path: Path, previous_release: ReleasedTree
) -> None:
    old = {"PYTHONPATH": previous_release.pythonpath}
    config = ClusterConfig(
        amqp_url=rabbitmq_url,
        redis_url=redis_url,
        work_dir=tmp_path / "new-services",
        store_replicas=1,
        agent_envs=(old, {}),
    )
    async with ChaosCluster(config) as cluster:
        await run_mixed(cluster)
        old_host = cluster.hosts[0].host_id
        # They learnt from its heartbeats that it reads the previous release's versions.
        for service in (*cluster.stores, *cluster.policies):
            learnt = {
                record.get("release")
                for record in service.log_records()
                if record.get("event") == "receiver's release learnt"
                and old_host in str(record.get("target"))
            }
            assert learnt == {previous_release.release}, service.name


async def test_a_capped_new_host_agent_works_beside_old_store_and_policy_under_load(
    rabbitmq_url: str, redis_url: str, tmp_path: Path, previous_release: ReleasedTree
) -> None:
    old = {"PYTHONPATH": previous_release.pythonpath}
    config = ClusterConfig(
        amqp_url=rabbitmq_url,
        redis_url=redis_url,
        work_dir=tmp_path / "old-services",
        store_replicas=1,
        store_env=old,
        policy_env=old,
        agent_envs=(old, {"KEEPER_UPGRADE_LEVEL": previous_release.release}),
    )
    async with ChaosCluster(config) as cluster:
        await run_mixed(cluster)
        assert not any(
            record.get("event") == "receiver's release learnt"
            for service in cluster.services
            for record in service.log_records()
        ), "the old services run the current code: PYTHONPATH did not take"


async def run_mixed(cluster: ChaosCluster) -> None:
    """Load, stops and cross-release starts on a started cluster; assert the outcome."""
    queues = [*SERVICE_QUEUES, *(host_command_queue(host.host_id) for host in cluster.hosts)]
    dead_letters_before = await dead_letter_depths(cluster, queues)
    vms = await cluster.place_vms(per_host=VMS_PER_HOST)
    load = StateLoad(vms, change_interval_s=CHANGE_INTERVAL_S)
    load.start()
    try:
        await asyncio.sleep(LOAD_S)
    finally:
        await load.stop()
    settled_after_s = await wait_until_stored(cluster, load, SETTLE_TIMEOUT_S)
    analysis = await analyse(cluster, load)
    assert settled_after_s is not None, "\n".join(analysis.problems[:25])
    assert not analysis.problems, "\n".join(analysis.problems[:25])
    assert analysis.versions_announced > 0

    await move_every_vm_to_the_other_host(cluster, load, vms)

    cluster.check_running()
    assert await dead_letter_depths(cluster, queues) == dead_letters_before
    assert cluster.count_log_lines(REFUSAL_LOG, cluster.services) == 0
    assert cluster.count_log_lines("message not sent", cluster.services) == 0


async def move_every_vm_to_the_other_host(
    cluster: ChaosCluster, load: StateLoad, vms: Sequence[ChaosVm]
) -> None:
    """Stop each VM (final state retrieved) and start it on the other host, whose agent
    runs the other release: the state it receives is the last the load wrote."""
    first, second = cluster.hosts
    for vm in vms:
        assert await cluster.client.stop(vm.vm_id, StopMode.SHUTDOWN), f"{vm.vm_id} not retrieved"
    for vm in vms:
        target = second if vm.host is first else first
        await cluster.client.start(vm.vm_id, target.host_id)
        assert target.tpm_state_hash(vm.vm_id) == load.last(vm.vm_id, StateKind.TPM).content_hash
        nvram = content_hash(target.nvram_path(vm.name).read_bytes())
        assert nvram == load.last(vm.vm_id, StateKind.NVRAM).content_hash


async def dead_letter_depths(cluster: ChaosCluster, queues: Sequence[QueueSpec]) -> dict[str, int]:
    """Messages in each queue's dead-letter queue (shared queues may hold earlier tests')."""
    return {
        queue.dead_letter_queue: await cluster.queue_depth(queue.dead_letter_queue)
        for queue in queues
    }
