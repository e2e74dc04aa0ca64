"""Redis SIGKILLed mid-run and started again from its append-only file.

A store replica, policy and one host with a few VMs under load run against a Redis of the
test's own (AOF on, ``appendfsync always``). Redis is killed with SIGKILL mid-run, left down
for a moment while the load goes on, and started again from the same directory. It proves:

- invariant 1: every version the store announced as persisted before the kill is still in
  Redis afterwards, with the same content; the store announces only after the durable write;
- the store survives losing Redis (its process does not exit) and reconnects: writes after
  the restart succeed, and the VMs' newest state ends up stored;
- the history still never puts older over newer, across the outage.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from chaos.harness import (
    ChaosCluster,
    ClusterConfig,
    StateLoad,
    analyse,
    figures_table,
    wait_until_stored,
)
from chaos.verdict import acknowledged_lost
from keeper_devtools.localstack import RedisServer
from keeper_shared.bus.topology import STATE_STORE_EVENTS

pytestmark = [pytest.mark.chaos, pytest.mark.redis, pytest.mark.rabbit, pytest.mark.libvirt]

VMS = 4
CHANGE_INTERVAL_S = 0.3
LOAD_BEFORE_KILL_S = 6.0
REDIS_DOWN_S = 3.0
LOAD_AFTER_RESTART_S = 6.0
DEAD_LETTERS = STATE_STORE_EVENTS.dead_letter_queue
OUTAGE_MARGIN_S = 0.5
QUIET_TIMEOUT_S = 60.0
"""Generous: a hang fails the test, slowness does not."""


async def test_redis_sigkill_and_restart_loses_no_acknowledged_version(
    rabbitmq_url: str, private_redis_server: RedisServer, tmp_path: Path
) -> None:
    redis_server = private_redis_server
    config = ClusterConfig(
        amqp_url=rabbitmq_url,
        redis_url=redis_server.url,
        work_dir=tmp_path / "chaos",
        hosts=1,
        store_replicas=1,
    )
    async with ChaosCluster(config) as cluster:
        vms = await cluster.place_vms(per_host=VMS)
        vm_ids = {vm.vm_id for vm in vms}
        load = StateLoad(vms, change_interval_s=CHANGE_INTERVAL_S)
        load.start()
        try:
            await asyncio.sleep(LOAD_BEFORE_KILL_S)
            dead_letters_before = await cluster.queue_depth(DEAD_LETTERS)
            await asyncio.to_thread(redis_server.kill)
            killed_at = time.time()
            await asyncio.sleep(REDIS_DOWN_S)
            cluster.check_running()  # the store must ride out the outage, not exit
            # Everything announced so far was written before the kill (Redis has been dead
            # since), including events still in flight at the kill.
            acknowledged = cluster.persisted_for(vm_ids)
            restarting_at = time.time()
            await asyncio.to_thread(redis_server.start)
            restarted_at = time.time()
            await asyncio.sleep(LOAD_AFTER_RESTART_S)
        finally:
            await load.stop()
        quiet_after_s = await wait_until_stored(cluster, load, QUIET_TIMEOUT_S)
        await asyncio.sleep(2 * config.heartbeat_interval_s)
        cluster.check_running()
        dead_lettered = await cluster.queue_depth(DEAD_LETTERS) - dead_letters_before

        lost = await acknowledged_lost(cluster, acknowledged)
        persisted = cluster.persisted_for(vm_ids)
        after_restart = [seen for seen in persisted if seen.received_at > restarted_at]
        # Announced (stamped by the store) while Redis was surely down: the margin covers a
        # write that returned just before the kill and was announced right after it.
        during_outage = [
            seen
            for seen in persisted
            if killed_at + OUTAGE_MARGIN_S < seen.envelope.time.timestamp() < restarting_at
        ]
        analysis = await analyse(cluster, load)
        handler_failures = cluster.count_log_lines("handler failed", cluster.stores)

    print()
    print(
        figures_table(
            f"Redis SIGKILL and restart: 1 host x {VMS} VMs, 1 store replica, Redis down "
            f"{REDIS_DOWN_S:.0f} s (seed {load.seed})",
            [
                ("changes made", load.changes),
                ("acknowledged versions before kill", len(acknowledged)),
                ("acknowledged versions lost (must be 0)", len(lost)),
                ("versions announced while Redis was down", len(during_outage)),
                ("versions persisted after restart", len(after_restart)),
                ("store handler failures (requeued)", handler_failures),
                ("store events dead-lettered meanwhile", dead_lettered),
                ("load stop -> all stored (s)", quiet_after_s),
                ("problems (must be 0)", len(analysis.problems)),
            ],
        )
    )
    for problem in analysis.problems[:25]:
        print(f"  problem: {problem}")
    assert acknowledged, "nothing was persisted before the kill: the test proves nothing"
    assert lost == []
    assert during_outage == [], "a version was announced while Redis was down"
    assert after_restart, "the store persisted nothing after Redis came back"
    assert not analysis.problems, "\n".join(analysis.problems[:25])
