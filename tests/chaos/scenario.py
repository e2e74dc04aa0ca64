"""One chaos run: every service a real process, faults one after another under load, then
every invariant checked and the figures printed as one table.

`run_chaos(backend, profile, work_dir)` is the whole run; the CI test and ``make chaos``
differ only in the `ChaosProfile` (and the cluster variant only in the backend). Each host
agent runs in a network namespace of its own, connects as its own RabbitMQ user (the store
checks it) and reaches the broker through a `TcpProxy`
(see `HostLink`, to cut it off); each store replica reaches Redis through a proxy (to lose
a reply after a write). Every VM's TPM state carries a canary
and bad input carrying it goes through the bus; when the services have stopped, every log
they and the servers wrote is scanned for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import secrets
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from chaos.backend import ChaosBackend
from chaos.engine_cluster import EngineChaosCluster
from chaos.faults import FaultInjector, FaultKind, Timing
from chaos.harness import (
    ChaosCluster,
    ClusterConfig,
    StateLoad,
    analyse,
    figures_table,
    host_id_for,
    wait_until_stored,
)
from chaos.netns import HostLink, HostNetwork, NetnsUnavailableError
from chaos.poison import PoisonOutcome, send_poison
from chaos.tcp_proxy import TcpProxy, plain_url_through, upstream_tls_for
from chaos.verdict import acknowledged_lost, classify, recovery_points
from support.leak_scan import find_leaks, leak_forms, read_files

CANARY_PREFIX = b"keeper-chaos-canary:"


@dataclass(frozen=True)
class ChaosProfile:
    """How big and how long a run is, and how many of each fault it injects."""

    name: str
    faults: dict[FaultKind, int]
    hosts: int = 3
    fast_vms_per_host: int = 3
    """VMs changing every ``change_interval_s`` (the load)."""
    slow_vms_per_host: int = 2
    """VMs changing every ``slow_change_interval_s``: at a host kill their content is often
    older than the recovery-point bound, which is what that check needs."""
    store_replicas: int = 3
    policy_replicas: int = 2
    change_interval_s: float = 0.4
    slow_change_interval_s: float = 6.0
    gap_s: tuple[float, float] = (1.0, 2.5)
    """Pause between one fault's recovery and the next fault."""
    timing: Timing = field(default_factory=Timing)
    recovery_point_bound_s: float = 5.0
    quiet_timeout_s: float = 120.0
    """Generous: a hang fails the run, slowness does not."""


CI_PROFILE = ChaosProfile(
    name="CI",
    faults={
        # Host kills are what the recovery-point check needs; every other fault kind is
        # injected at least once. `make chaos` runs each many times (LONG_PROFILE).
        FaultKind.HOST_KILL: 5,
        FaultKind.STORE_KILL: 3,
        FaultKind.POLICY_KILL: 1,
        FaultKind.BROKER_RESTART: 1,
        FaultKind.REDIS_RESTART: 1,
        FaultKind.HOST_CUT: 1,
        FaultKind.REPLY_DROP: 1,
    },
)
LONG_PROFILE = ChaosProfile(
    name="long",
    faults={
        FaultKind.HOST_KILL: 20,
        FaultKind.STORE_KILL: 20,
        FaultKind.POLICY_KILL: 8,
        FaultKind.BROKER_RESTART: 5,
        FaultKind.REDIS_RESTART: 5,
        FaultKind.HOST_CUT: 8,
        FaultKind.REPLY_DROP: 8,
    },
    hosts=4,
    fast_vms_per_host=5,
    slow_vms_per_host=3,
    gap_s=(1.0, 4.0),
)

DISTRIBUTED_PROFILE = ChaosProfile(
    name="distributed",
    faults={
        FaultKind.HOST_KILL: 3,
        FaultKind.STORE_KILL: 3,
        FaultKind.POLICY_KILL: 2,
        FaultKind.BROKER_RESTART: 2,
        FaultKind.REDIS_RESTART: 2,
    },
)
"""The faults the distributed engines add meaning to: a broker restart is a node SIGKILLed
and started again, a Redis restart a primary SIGKILLed, failed over by the Sentinels and
back as the new primary's replica."""
DISTRIBUTED_LONG_PROFILE = ChaosProfile(
    name="distributed, long",
    faults={
        FaultKind.HOST_KILL: 8,
        FaultKind.STORE_KILL: 8,
        FaultKind.POLICY_KILL: 4,
        FaultKind.BROKER_RESTART: 4,
        FaultKind.REDIS_RESTART: 4,
    },
    hosts=4,
    fast_vms_per_host=5,
    slow_vms_per_host=3,
    gap_s=(1.0, 4.0),
)


@dataclass
class ChaosReport:
    """Everything a run measured; `failures` lists each invariant it saw broken."""

    backend: str
    profile: str
    seed: int
    faults: Counter[FaultKind] = field(default_factory=Counter)
    changes_made: int = 0
    changes_stored: int = 0
    acknowledged: int = 0
    refused: int = 0
    """Writes the store refused and audited (stale tokens after faults; not failures)."""
    acknowledged_lost: list[str] = field(default_factory=list)
    stale_overwrites: list[str] = field(default_factory=list)
    applied_twice: list[str] = field(default_factory=list)
    other_problems: list[str] = field(default_factory=list)
    recovery_point_bound_s: float = 0.0
    recovery_points_checked: int = 0
    recovery_point_violations: list[str] = field(default_factory=list)
    worst_recovery_point_s: float = 0.0
    worst_recovery_point_since_writable_s: float = 0.0
    """The same, counted from when the store could last write again (see verdict)."""
    broker_restarts_survived: int = 0
    worst_consumers_back_s: float = 0.0
    replies_dropped: int = 0
    poison: PoisonOutcome = field(default_factory=PoisonOutcome)
    host_cut_by: str = ""
    """How hosts were cut off (link down in a namespace, or only at the proxy, and why)."""
    canary_hits: list[str] = field(default_factory=list)
    canary_files_scanned: int = 0
    scanner_finds_planted_hit: bool = False
    all_stored_after_s: float | None = None
    wall_s: float = 0.0
    fault_log: list[str] = field(default_factory=list)
    """One line per fault: when (seconds into the run), what, to whom."""

    def failures(self) -> list[str]:
        """Each broken invariant, with its first examples."""
        found = []
        for what, items in (
            ("acknowledged versions lost", self.acknowledged_lost),
            ("stale overwrites", self.stale_overwrites),
            ("writes applied twice", self.applied_twice),
            ("other history problems", self.other_problems),
            ("recovery-point violations", self.recovery_point_violations),
            ("crafted prepares accepted", self.poison.prepares_accepted),
            ("files written outside their place", self.poison.escaped_files),
            ("canary hits", self.canary_hits),
        ):
            if items:
                found.append(f"{what} ({len(items)}): " + "; ".join(items[:10]))
        if self.all_stored_after_s is None:
            found.append("the newest state of every VM was not stored after the load stopped")
        if self.broker_restarts_survived != self.faults[FaultKind.BROKER_RESTART]:
            found.append("a broker restart was not survived (consumers missing)")
        if not self.scanner_finds_planted_hit:
            found.append("the leak scanner missed a planted canary: its 0 hits mean nothing")
        return found

    def table(self) -> str:
        """The figures, one per line."""
        rows: list[tuple[str, object]] = [
            ("faults injected", sum(self.faults.values())),
            *((f"  {kind.value}", self.faults[kind]) for kind in FaultKind),
            ("changes made", self.changes_made),
            ("changes stored (versions)", self.changes_stored),
            ("acknowledged versions checked", self.acknowledged),
            ("writes refused by the store (audited)", self.refused),
            ("acknowledged lost (must be 0)", len(self.acknowledged_lost)),
            ("stale overwrites (must be 0)", len(self.stale_overwrites)),
            ("writes applied twice (must be 0)", len(self.applied_twice)),
            ("other history problems (must be 0)", len(self.other_problems)),
            ("recovery-point bound (s)", self.recovery_point_bound_s),
            ("stable changes checked at host kills", self.recovery_points_checked),
            ("  not stored (must be 0)", len(self.recovery_point_violations)),
            ("worst recovery point observed (s)", self.worst_recovery_point_s),
            (
                "  counted from when writes were possible (s)",
                self.worst_recovery_point_since_writable_s,
            ),
            ("broker restarts survived", self.broker_restarts_survived),
            ("worst broker restart -> consumers back (s)", self.worst_consumers_back_s),
            ("Redis replies lost after a write", self.replies_dropped),
            ("hosts cut off by", self.host_cut_by),
            ("bad messages with the canary sent", self.poison.sent),
            ("crafted prepares accepted (must be 0)", len(self.poison.prepares_accepted)),
            ("log files scanned for the canary", self.canary_files_scanned),
            ("canary hits (must be 0)", len(self.canary_hits)),
            ("scanner finds a planted canary", "yes" if self.scanner_finds_planted_hit else "NO"),
            ("load stop -> newest state all stored (s)", self.all_stored_after_s),
            ("run wall time (s)", self.wall_s),
        ]
        title = f"chaos ({self.profile}) on {self.backend} (seed {self.seed})"
        return figures_table(title, rows)


def fault_sequence(profile: ChaosProfile, rng: random.Random) -> list[FaultKind]:
    """Every fault of the profile once per count, in a random order."""
    sequence = [kind for kind, count in profile.faults.items() for _ in range(count)]
    rng.shuffle(sequence)
    return sequence


def _via(
    url: str, proxy: TcpProxy, user: tuple[str, str] | None = None, host: str | None = None
) -> str:
    """``url`` pointed at ``proxy`` instead of the server (dialled as ``host``, by default
    its address), as ``user`` (name, password) when given."""
    parts = urlsplit(url)
    credentials = parts.netloc.rsplit("@", 1)[0] + "@" if "@" in parts.netloc else ""
    if user is not None:
        credentials = f"{user[0]}:{user[1]}@"
    address = f"{host or proxy.listen_host}:{proxy.port}"
    return urlunsplit(parts._replace(netloc=f"{credentials}{address}"))


def _target(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    if parts.hostname is None or parts.port is None:
        raise ValueError(f"no host and port in {url.split('@')[-1]}")
    return parts.hostname, parts.port


@contextlib.asynccontextmanager
async def _proxies(url: str, count: int) -> AsyncIterator[list[TcpProxy]]:
    # The reply-drop fault reads the Redis protocol: the proxies end TLS (see TcpProxy).
    proxies = [TcpProxy(*_target(url), upstream_tls=upstream_tls_for(url)) for _ in range(count)]
    try:
        for proxy in proxies:
            await proxy.start()
        yield proxies
    finally:
        for proxy in proxies:
            await proxy.close()


@contextlib.asynccontextmanager
async def _host_links(url: str, count: int) -> AsyncIterator[tuple[list[HostLink], str]]:
    """A link per host, in a namespace of its own where that can be made; and which."""
    networks: list[HostNetwork] = []
    how = "veth link down (netns)"
    try:
        for index in range(1, count + 1):
            networks.append(await asyncio.to_thread(HostNetwork.create, index))
    except NetnsUnavailableError as error:
        for network in networks:
            await asyncio.to_thread(network.destroy)
        networks = []
        how = f"proxy reset only ({error})"
    links = [
        HostLink(
            TcpProxy(
                *_target(url), listen_host=networks[i].machine_address if networks else "127.0.0.1"
            ),
            networks[i] if networks else None,
        )
        for i in range(count)
    ]
    try:
        for link in links:
            await link.proxy.start()
        yield links, how
    finally:
        for link in links:
            await link.proxy.close()
            if link.network is not None:
                await asyncio.to_thread(link.network.destroy)


async def run_chaos(
    backend: ChaosBackend, profile: ChaosProfile, work_dir: Path, seed: int | None = None
) -> ChaosReport:
    """Run ``profile`` against ``backend`` and return what it measured."""
    seed = seed if seed is not None else secrets.randbits(32)
    rng = random.Random(seed)
    report = ChaosReport(backend.name, profile.name, seed)
    report.recovery_point_bound_s = profile.recovery_point_bound_s
    canary = CANARY_PREFIX + secrets.token_bytes(24)
    began = time.monotonic()
    run_id = secrets.token_hex(3)
    engines = backend.engines
    # On the distributed engines every service follows the broker nodes and the Sentinels
    # itself, so nothing sits between them: no host links to cut, no Redis proxy, and the
    # agents connect as the shared user (per-host users are the single-node run's proof).
    proxied = not engines.amqp_urls
    host_users = [
        (host_id_for(run_id, index), secrets.token_hex(16)) for index in range(1, profile.hosts + 1)
    ]
    if proxied:
        for host_id, password in host_users:
            await asyncio.to_thread(backend.add_host_user, host_id, password)
    async with (
        _host_links(backend.amqp_url, profile.hosts if proxied else 0) as (host_links, cut_by),
        _proxies(backend.redis_url, profile.store_replicas if proxied else 0) as redis_proxies,
    ):
        report.host_cut_by = cut_by if proxied else "(not in this run)"
        config = ClusterConfig(
            amqp_url=backend.amqp_url,
            redis_url=backend.redis_url,
            work_dir=work_dir,
            hosts=profile.hosts,
            store_replicas=profile.store_replicas,
            policy_replicas=profile.policy_replicas,
            run_id=run_id,
            verify_host_identity=proxied,
            agent_amqp_urls=tuple(
                _via(backend.amqp_url, link.proxy, user, host=link.dial_host)
                for link, user in zip(host_links, host_users[: len(host_links)], strict=True)
            ),
            agent_command_prefixes=tuple(
                link.network.command_prefix if link.network else () for link in host_links
            ),
            store_redis_urls=tuple(
                plain_url_through(proxy, backend.redis_url) for proxy in redis_proxies
            ),
        )
        cluster = ChaosCluster(config) if proxied else EngineChaosCluster(config, engines)
        async with cluster:
            fast = StateLoad(
                await cluster.place_vms(per_host=profile.fast_vms_per_host),
                change_interval_s=profile.change_interval_s,
                seed=rng.randrange(2**32),
                embed_in_tpm=canary,
            )
            slow = StateLoad(
                await cluster.place_vms(per_host=profile.slow_vms_per_host),
                change_interval_s=profile.slow_change_interval_s,
                seed=rng.randrange(2**32),
                embed_in_tpm=canary,
            )
            injector = FaultInjector(
                cluster,
                backend,
                host_links=host_links,
                store_redis_proxies=redis_proxies,
                timing=profile.timing,
                rng=rng,
            )
            fast.start()
            slow.start()
            try:
                report.poison = await send_poison(cluster, canary)
                for kind in fault_sequence(profile, rng):
                    await asyncio.sleep(rng.uniform(*profile.gap_s))
                    await injector.inject(kind)
                await asyncio.sleep(profile.recovery_point_bound_s)  # the last kill's aftermath
            finally:
                await fast.stop()
                await slow.stop()
            report.all_stored_after_s = await _all_stored(cluster, [fast, slow], profile)
            await asyncio.sleep(2 * config.heartbeat_interval_s)  # late events, late writes
            cluster.check_running()
            await _judge(report, cluster, [fast, slow], injector, profile)
        report.replies_dropped = sum(proxy.replies_dropped for proxy in redis_proxies)
    _scan_for_canary(report, canary, [cluster.logs_dir, *backend.server_logs()], work_dir)
    report.wall_s = time.monotonic() - began
    return report


async def _all_stored(
    cluster: ChaosCluster, loads: list[StateLoad], profile: ChaosProfile
) -> float | None:
    started = time.monotonic()
    for load in loads:
        remaining = profile.quiet_timeout_s - (time.monotonic() - started)
        if await wait_until_stored(cluster, load, max(remaining, 1.0)) is None:
            return None
    return time.monotonic() - started


async def _judge(
    report: ChaosReport,
    cluster: ChaosCluster,
    loads: list[StateLoad],
    injector: FaultInjector,
    profile: ChaosProfile,
) -> None:
    faults = injector.injected
    report.faults = Counter(fault.kind for fault in faults)
    origin = faults[0].at if faults else 0.0
    report.fault_log = [
        f"+{fault.at - origin:6.1f} s  {fault.kind.value}: {fault.target} "
        f"(back after {fault.back_at - fault.at:.1f} s)"
        for fault in faults
    ]
    restarts = [fault for fault in faults if fault.kind is FaultKind.BROKER_RESTART]
    report.broker_restarts_survived = sum(fault.recovery_s is not None for fault in restarts)
    report.worst_consumers_back_s = max((fault.recovery_s or 0.0 for fault in restarts), default=0)
    problems: list[str] = []
    for load in loads:
        report.changes_made += load.changes
        analysis = await analyse(cluster, load)
        report.changes_stored += analysis.versions_stored
        problems.extend(analysis.problems)
    report.stale_overwrites, report.applied_twice, report.other_problems = classify(problems)
    acknowledged = cluster.persisted_for(cluster.vm_ids)
    # A redelivered change re-announces its version: count versions, not announcements.
    report.acknowledged = len({(s.data.vm_id, s.data.kind, s.data.version) for s in acknowledged})
    report.refused = len(cluster.refused_for(cluster.vm_ids))
    report.acknowledged_lost = await acknowledged_lost(cluster, acknowledged)
    points = await recovery_points(cluster, loads, faults, profile.recovery_point_bound_s)
    report.recovery_points_checked = points.checked
    report.recovery_point_violations = points.violations
    report.worst_recovery_point_s = points.worst_s
    report.worst_recovery_point_since_writable_s = points.worst_since_writable_s


def _scan_for_canary(report: ChaosReport, canary: bytes, logs: list[Path], work_dir: Path) -> None:
    """Scan every log for the canary, after proving the scan finds a planted one."""
    needles = leak_forms(canary)
    planted = work_dir / "scanner-self-check" / "planted.log"
    planted.parent.mkdir(parents=True, exist_ok=True)
    planted.write_bytes(b"oops " + needles[3] + b"\n")  # the base64 form
    report.scanner_finds_planted_hit = find_leaks(read_files([planted.parent]), needles) == [
        str(planted)
    ]
    planted.unlink()
    files = list(read_files(logs))
    report.canary_files_scanned = len(files)
    report.canary_hits = find_leaks(files, needles)
