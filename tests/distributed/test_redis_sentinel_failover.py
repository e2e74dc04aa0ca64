"""The Redis primary failed over by Sentinel mid-run.

A Redis primary with one replica and three Sentinels; two store replicas and policy follow
the master name through the Sentinels, and the store acknowledges a write only once the
replica holds it (``WAIT 1``). Two host agents run VMs under load. The primary is
SIGKILLed; the Sentinels promote the replica; the old primary is started again and the
Sentinels make it the new primary's replica (they wait about 8 s before they do). Until
then the new primary has no replica, so the store acknowledges nothing: its events are
requeued, and the ones that reach their delivery limit are dead-lettered. The load stops
the moment the replica is back. It proves:

- the store follows the new primary by itself (writes after the failover are persisted);
- no acknowledged write is lost: every version announced as persisted before the kill is
  on the new primary, with the same content (counted and printed, must be 0);
- through heartbeat reconciliation (the hosts list their current hashes every heartbeat),
  every running VM's newest state, changed while nothing could be acknowledged, is back in
  the store once it can write durably again; the time that takes is printed beside the
  heartbeat interval;
- the history never puts older over newer (the chaos harness's checks).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from chaos.engine_cluster import EngineChaosCluster, Engines
from chaos.harness import ClusterConfig, StateLoad, analyse, figures_table, wait_until_stored
from chaos.verdict import acknowledged_lost
from keeper_devtools.localstack import RedisSentinelGroup
from keeper_shared.bus.topology import STATE_STORE_EVENTS

pytestmark = [pytest.mark.chaos, pytest.mark.rabbit, pytest.mark.redis, pytest.mark.libvirt]

VMS_PER_HOST = 2
CHANGE_INTERVAL_S = 0.3
HEARTBEAT_INTERVAL_S = 1.0
LOAD_BEFORE_KILL_S = 4.0
FAILOVER_TIMEOUT_S = 60.0
QUIET_TIMEOUT_S = 90.0
"""Generous: a hang fails the test, slowness does not."""
NOT_REPLICATED = "NotReplicatedError"
"""What a store replica logs when WAIT found too few replicas (the event is requeued)."""
RECONCILED = "reconciling from heartbeat"
"""What a store replica logs when a heartbeat lists state it does not hold."""


async def test_sentinel_failover_loses_no_acknowledged_write(
    redis_sentinel_group: RedisSentinelGroup, rabbitmq_url: str, tmp_path: Path
) -> None:
    group = redis_sentinel_group
    config = ClusterConfig(
        amqp_url=rabbitmq_url,
        redis_url=group.primary().url,
        work_dir=tmp_path / "chaos",
        hosts=2,
        store_replicas=2,
        heartbeat_interval_s=HEARTBEAT_INTERVAL_S,
    )
    engines = Engines(
        redis_sentinels=group.sentinel_addresses,
        redis_master_name=group.master_name,
        redis_sentinel_password=group.sentinel_password,
        store_min_replicas=1,
    )
    async with EngineChaosCluster(config, engines) as cluster:
        vms = await cluster.place_vms(per_host=VMS_PER_HOST)
        vm_ids = {vm.vm_id for vm in vms}
        load = StateLoad(vms, change_interval_s=CHANGE_INTERVAL_S)
        load.start()
        try:
            await asyncio.sleep(LOAD_BEFORE_KILL_S)
            old_primary = await asyncio.to_thread(group.kill_primary)
            killed_at = time.time()
            # Announced before the kill, or in flight: all acknowledged by the old primary
            # and, with WAIT, by its replica.
            acknowledged = cluster.persisted_for(vm_ids)
            new_primary = await asyncio.to_thread(
                group.wait_for_failover, old_primary, FAILOVER_TIMEOUT_S
            )
            failed_over_at = time.time()
            # Back as the new primary's replica, so WAIT 1 can be met again.
            await asyncio.to_thread(old_primary.start)
            await asyncio.to_thread(group.wait_for_replica, FAILOVER_TIMEOUT_S)
            durable_again_at = time.time()
        finally:
            await load.stop()
        quiet_after_s = await wait_until_stored(cluster, load, QUIET_TIMEOUT_S)
        cluster.check_running()

        lost = await acknowledged_lost(cluster, acknowledged)
        persisted = cluster.persisted_for(vm_ids)
        after_failover = [seen for seen in persisted if seen.received_at > failed_over_at]
        analysis = await analyse(cluster, load)
        not_replicated = cluster.count_log_lines(NOT_REPLICATED, cluster.stores)
        reconciled = cluster.count_log_lines(RECONCILED, cluster.stores)
        dead_lettered = await cluster.queue_depth(STATE_STORE_EVENTS.dead_letter_queue)
        primary_now = group.primary()
        exit_codes = await cluster.stop()  # SIGTERM: each must stop cleanly

    print()
    print(
        figures_table(
            f"Redis primary failed over by Sentinel: primary + replica + 3 Sentinels, WAIT 1, "
            f"2 hosts x {VMS_PER_HOST} VMs, 2 store replicas (seed {load.seed})",
            [
                ("changes made", load.changes),
                ("acknowledged versions before kill", len(acknowledged)),
                ("acknowledged writes the failover lost (must be 0)", len(lost)),
                ("kill -> Sentinels promote the replica (s)", failed_over_at - killed_at),
                ("promotion -> a replica online again (s)", durable_again_at - failed_over_at),
                ("writes not acknowledged: too few replicas", not_replicated),
                ("store events dead-lettered meanwhile", dead_lettered),
                ("versions persisted after the failover", len(after_failover)),
                ("heartbeats that made the store pull", reconciled),
                ("heartbeat interval (s)", HEARTBEAT_INTERVAL_S),
                ("replica online -> every VM's newest state stored (s)", quiet_after_s),
                ("worst recovery point (s)", analysis.max_recovery_s),
                ("problems (must be 0)", len(analysis.problems)),
            ],
        )
    )
    for problem in analysis.problems[:25]:
        print(f"  problem: {problem}")
    assert new_primary is not old_primary
    assert primary_now is new_primary, "the Sentinels moved the primary again"
    assert acknowledged, "nothing was persisted before the kill: the test proves nothing"
    assert lost == []
    assert after_failover, "the store persisted nothing after the failover"
    assert quiet_after_s is not None, "the newest state of some VM never reached the store"
    assert not analysis.problems, "\n".join(analysis.problems[:25])
    assert all(code == 0 for code in exit_codes.values()), exit_codes
