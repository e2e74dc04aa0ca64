"""Three state-store replicas on one stream, one SIGKILLed every few seconds.

Two hosts with ten VMs each change their TPM and NVRAM about every 0.3 s per VM for 30 s
while a replica chosen at random is killed with SIGKILL every 2-4 s and restarted. Then the
load stops and the test waits until every host's heartbeat has been reconciled. It proves:

- every VM's newest content, for both kinds, is the store's head (invariant 1 and the
  heartbeat reconciliation: lost events cost at most a heartbeat);
- never older over newer (invariant 2): in Redis's history and in the ``state.persisted``
  events, versions are distinct, tokens strictly grow with the version, and the contents
  follow the order the load wrote them; no announced version is newer than the head;
- no torn read is stored (invariant 6): every stored content is one the load wrote whole;
- redeliveries change nothing (invariant 8): no version repeats its predecessor's content.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from chaos.harness import (
    ChaosCluster,
    ClusterConfig,
    ReplicaKiller,
    StateLoad,
    analyse,
    figures_table,
    wait_until_stored,
)

pytestmark = [pytest.mark.chaos, pytest.mark.rabbit, pytest.mark.redis, pytest.mark.libvirt]

HOSTS = 2
VMS_PER_HOST = 10
STORE_REPLICAS = 3
LOAD_S = 30.0
CHANGE_INTERVAL_S = 0.3
KILL_EVERY_S = (2.0, 4.0)
QUIET_TIMEOUT_S = 60.0
"""Generous: a hang fails the test, slowness does not."""


async def test_replicas_killed_mid_stream_keep_newest_state_and_never_older_over_newer(
    rabbitmq_url: str, redis_url: str, tmp_path: Path
) -> None:
    config = ClusterConfig(
        amqp_url=rabbitmq_url,
        redis_url=redis_url,
        work_dir=tmp_path / "chaos",
        hosts=HOSTS,
        store_replicas=STORE_REPLICAS,
    )
    async with ChaosCluster(config) as cluster:
        vms = await cluster.place_vms(per_host=VMS_PER_HOST)
        load = StateLoad(vms, change_interval_s=CHANGE_INTERVAL_S)
        killer = ReplicaKiller(cluster, cluster.stores, every_s=KILL_EVERY_S)
        load.start()
        killer.start()
        try:
            await asyncio.sleep(LOAD_S)
        finally:
            await killer.stop()
            await load.stop()
        quiet_after_s = await wait_until_stored(cluster, load, QUIET_TIMEOUT_S)
        await asyncio.sleep(2 * config.heartbeat_interval_s)  # late events, late writes
        cluster.check_running()
        analysis = await analyse(cluster, load)
        refused = cluster.refused_for(cluster.vm_ids)
        handler_failures = cluster.count_log_lines("handler failed", cluster.stores)

    print()
    print(
        figures_table(
            f"store replicas under SIGKILL: {HOSTS} hosts x {VMS_PER_HOST} VMs, "
            f"{STORE_REPLICAS} replicas, {LOAD_S:.0f} s of load (seed {load.seed})",
            [
                ("replicas killed (SIGKILL)", len(killer.killed)),
                ("changes made", load.changes),
                ("versions persisted (Redis)", analysis.versions_stored),
                ("versions announced (events)", analysis.versions_announced),
                ("refused writes", len(refused)),
                ("store handler failures", handler_failures),
                ("versions stored, never announced", analysis.unannounced_versions),
                ("final contents never announced", analysis.unannounced_finals),
                ("max last change -> persisted (s)", analysis.max_recovery_s),
                ("load stop -> all stored (s)", quiet_after_s),
                ("problems (must be 0)", len(analysis.problems)),
            ],
        )
    )
    for problem in analysis.problems[:25]:
        print(f"  problem: {problem}")
    for refusal in refused[:10]:
        data = refusal.data
        print(f"  refused: {data.kind.value} of {data.vm_id[:8]}: {data.reason}")
    assert len(killer.killed) >= 5, "the fault was not injected often enough to mean anything"
    assert not analysis.problems, "\n".join(analysis.problems[:25])
