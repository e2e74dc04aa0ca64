"""The real state store on a Redis Cluster beside the single Redis, in the same run.

A local cluster of three primaries with one replica each (Debian's ``redis-server``, AOF with
``appendfsync always`` on every node, as the bench's single Redis) is started for this
part. One store process at a time consumes the events (they share the queue), so each round
starts a store on one backend, drives the scale part's simulated hosts in a closed loop
(10 hosts x 20 VMs, real TPM and NVRAM blobs), stops it, and the next round takes the other
backend; the order alternates from round to round. Three backends: the single Redis, the
cluster, and the cluster with every write waiting for its shard's replica (``WAIT 1``, what
a deployment that must not lose an acknowledged write on a failover runs).

CPU per version is utime + stime of the store process and of every Redis process of the
backend over the measured loop, divided by the versions persisted in it (the memory figures
come from the scale part, on the single Redis).
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from bench import content, scale
from bench.env import start_service, store_process, store_sealing_key_file
from keeper_devtools.demo.processes import ServiceProcess
from keeper_devtools.localstack.redis_cluster import RedisClusterGroup
from keeper_shared.messages.types import StateKind
from keeper_shared.redis_access.connection import RedisSettings, connect_redis
from keeper_shared.sealing.keys import SealingPublicKey, load_private_key

if TYPE_CHECKING:
    from bench.runner import Bench

HOSTS = 10

METHOD = (
    "- **Cluster**: a local Redis Cluster (3 primaries + 3 replicas of Debian's redis-server, "
    "AOF `appendfsync always` on every node, no TLS as the single Redis here) started for this "
    "part. One real store process at a time (they would share the queue): each round runs it "
    f"on one backend against the scale part's responder ({HOSTS} simulated hosts, the same "
    "VMs, TPM and NVRAM), closed loop after a 2-change warm-up, then the next backend; the "
    "order alternates per round. Backends: the single Redis, the cluster, and the cluster with "
    "each write waiting for one replica of its shard (`KEEPER_STORE_REDIS_MIN_REPLICAS=1`). "
    "CPU per version: utime + stime of the store and of every Redis process of the backend "
    "over the measured loop, divided by the versions persisted in it."
)
"""The report's description of this part."""


@dataclass(frozen=True)
class Backend:
    """One Redis the store runs on in a round."""

    key: str
    label: str
    env: dict[str, str]
    redis_pids: list[int | None]


async def cluster_benchmarks(bench: Bench) -> None:
    """Store throughput and CPU per version on the cluster and on the single Redis."""
    settings = bench.settings
    # The bench's own store consumes the same queue: it stays stopped from here on.
    await bench.store.stop(10.0)
    cluster = RedisClusterGroup.local(bench.work / "redis-cluster")
    hosts: scale.FakeHosts | None = None
    try:
        cluster.start()
        bench.say("Redis Cluster of 3 primaries + 3 replicas started")
        cluster_client = connect_redis(
            RedisSettings(
                redis_url="redis://127.0.0.1/0", redis_cluster_nodes=cluster.startup_nodes
            )
        )
        pools = {
            StateKind.TPM: content.variants(StateKind.TPM, bench.tpm.permall, 8, seed=1),
            StateKind.NVRAM: content.variants(StateKind.NVRAM, content.nvram_base(), 8, seed=2),
        }
        store_key = load_private_key(store_sealing_key_file(bench.work)).public_key()
        hosts = await scale.FakeHosts.start(
            bench.bus, pools, SealingPublicKey(store_key), settings.inline_budget
        )
        run = uuid.uuid4().hex[:4]
        host_ids = [f"bench-c-{run}-{i}" for i in range(HOSTS)]
        vms = [scale.FakeVm(str(uuid.uuid4()), host_ids[i % HOSTS]) for i in range(settings.vms)]
        await hosts.serve(host_ids)
        await scale.place(bench.redis, vms)
        await scale.place(cluster_client, vms)
        await cluster_client.aclose()
        cluster_nodes = {
            "KEEPER_STORE_REDIS_URL": "redis://127.0.0.1/0",
            "KEEPER_STORE_REDIS_CLUSTER_NODES": ",".join(cluster.startup_nodes),
        }
        cluster_pids = [server.pid() for server in cluster.servers]
        backends = [
            Backend("single", "single Redis", {}, [bench.stack.redis.pid()]),
            Backend("cluster", "Redis Cluster, 3 shards", cluster_nodes, cluster_pids),
            Backend(
                "cluster_wait",
                "Redis Cluster, 3 shards, WAIT 1 replica",
                {**cluster_nodes, "KEEPER_STORE_REDIS_MIN_REPLICAS": "1"},
                cluster_pids,
            ),
        ]
        for index in range(settings.rounds):
            order = backends if index % 2 == 0 else list(reversed(backends))
            for backend in order:
                await _round(bench, hosts, vms, backend, f"{backend.key}-{index + 1}")
        _ratios(bench)
    finally:
        if hosts is not None:
            with contextlib.suppress(Exception):
                await hosts.close()
        cluster.stop()


async def _round(
    bench: Bench,
    hosts: scale.FakeHosts,
    vms: list[scale.FakeVm],
    backend: Backend,
    name: str,
) -> None:
    settings = bench.settings
    base = store_process(
        bench.stack,
        bench.work,
        bench.work / "keys" / "kek.key",
        history_depth=settings.history_depth,
    )
    store = ServiceProcess(
        f"store-{name}",
        base.module,
        {**base.env, **backend.env, "KEEPER_STORE_REPLICA_ID": f"bench-store-{name}"},
        bench.work / "logs" / f"store-{name}.log",
    )
    await start_service(store)
    try:
        both = [StateKind.TPM, StateKind.NVRAM]
        # Warm-up: data keys made, scripts loaded, connections to every shard open.
        await scale.closed_loop(hosts, bench.recorder, vms, both, duration_s=None, steps=2)
        assert store.process is not None
        pids = [store.process.pid, *backend.redis_pids]
        store_before, redis_before = bench.cpu_of(pids[0]), bench.cpu_of(*pids[1:])
        loop = await scale.closed_loop(
            hosts, bench.recorder, vms, both, duration_s=settings.scale_s
        )
        store_cpu = bench.cpu_of(pids[0]) - store_before
        redis_cpu = bench.cpu_of(*pids[1:]) - redis_before
    finally:
        await store.stop(10.0)
    if loop.timeouts:
        bench.notes.append(f"cluster part, {backend.label}: {loop.timeouts} changes timed out")
    versions = max(loop.persisted, 1)
    label = f"{HOSTS} simulated hosts x {settings.vms // HOSTS} VMs, TPM and NVRAM"
    bench.figure(
        f"backend_{backend.key}", f"Store throughput on a {backend.label} ({label})", "versions/s"
    ).add(loop.persisted_in_time / loop.seconds)
    bench.figure(
        f"backend_{backend.key}_store_cpu", f"… state store CPU per version ({backend.label})", "ms"
    ).add(1000 * store_cpu / versions)
    bench.figure(
        f"backend_{backend.key}_redis_cpu",
        f"… Redis CPU per version, every node ({backend.label})",
        "ms",
    ).add(1000 * redis_cpu / versions)
    bench.say(f"cluster part: {backend.label} round done ({loop.persisted} versions)")


def _ratios(bench: Bench) -> None:
    """Cluster over single Redis, round by round (each pair measured back to back)."""
    single = bench.figures["backend_single"].rounds
    for key, label in (("cluster", "Redis Cluster"), ("cluster_wait", "Redis Cluster with WAIT 1")):
        cluster = bench.figures[f"backend_{key}"].rounds
        ratio = bench.figure(
            f"backend_{key}_ratio", f"Store throughput, {label} / single Redis", "ratio"
        )
        for on_cluster, on_single in zip(cluster, single, strict=True):
            ratio.add(on_cluster / on_single)


def summary(median: Callable[[str], float]) -> list[str]:
    """The report's line on the cluster (none when the part did not run)."""
    ratio, waiting = median("backend_cluster_ratio"), median("backend_cluster_wait_ratio")
    if ratio != ratio:  # nan: not measured
        return []
    return [
        f"- Redis Cluster (3 shards): store throughput {ratio:.2f} of the single Redis in the "
        f"same run, {waiting:.2f} with every write waiting for a replica of its shard"
    ]
