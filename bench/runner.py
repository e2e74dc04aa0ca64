"""The benchmarks, in order, against one private broker and Redis."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from redis.asyncio import Redis

from bench import (
    cluster,
    consume_floor,
    content,
    essential,
    idle,
    pipeline,
    profile,
    raw,
    restore,
    scale,
    storm,
)
from bench.env import (
    PersistedRecorder,
    Stack,
    agent_process,
    cpu_seconds,
    rss_bytes,
    start_service,
    store_process,
    store_sealing_key_file,
)
from bench.hosts import OVMF_VARS_SIZE, BenchVm, lay_out_host
from bench.stats import Figure, percentile
from keeper_devtools.demo.processes import ServiceProcess
from keeper_host_agent.detect.inline_state import InlineBudget
from keeper_shared.bus.client import BusClient
from keeper_shared.messages.types import FencingToken, StateKind
from keeper_shared.redis_access.keys import placement_key
from keeper_shared.sealing.keys import (
    SealingPublicKey,
    create_private_key_file,
    load_private_key,
)
from keeper_shared.state_format.blobs import seal_blob
from keeper_shared.state_format.tpm_archive import MAIN_STATE_FILE_NAME, pack_tpm_state
from keeper_state_store.crypto.encryption import generate_key_file

TPM_SIZE = 16 * 1024
PERSISTED_EVENT_SIZE = 512
"""Bytes of a ``state.persisted`` body on the wire (its JSON envelope is about 490), as the
floor counts it."""
FLOOR_EVENT_SIZE = 4096
"""About a fan-in event with one change: a TPM state sealed inline is 5.5 KB, an NVRAM's
under 1 KB."""
STORM_WAIT_S = 180.0
"""How long the boot storm waits for every VM's newest state (keeps `make bench` bounded)."""
SIZES = (("tpm", TPM_SIZE, "16 KiB"), ("nvram", OVMF_VARS_SIZE, "540 KiB"))


@dataclass(frozen=True)
class Settings:
    """How long and how many."""

    rounds: int = 3
    quick: bool = False
    window_s: float = 0.05
    """Stability window of the pipeline's host agent (a latency, reported apart)."""
    vms: int = 200
    idle_vms: int = 1000
    latency_rate: float = 50.0
    restore_calls: int = 100
    history_depth: int = 100
    parts: tuple[str, ...] = ("pipeline", "idle", "scale", "cluster")
    inline: bool = True
    """Hosts send small state inline with its change (the agent's opt-in); False announces
    every change by its hash alone, so each version is fetched (the agent's default)."""
    fanin_vms: int = 1000
    """VMs in flight in the fan-in series, spread over each of ``fanin_hosts``."""
    fanin_hosts: tuple[int, ...] = (1, 10, 100, 1000)
    storm_hosts: int = 100

    @property
    def inline_budget(self) -> InlineBudget:
        """What the simulated hosts inline: the agent's default, or nothing."""
        return InlineBudget() if self.inline else InlineBudget(0, 0)

    @property
    def fanin_s(self) -> float:
        """Measured seconds of each fan-in round, after ``fanin_warmup_s``: many times the
        time a change takes to come back with a thousand VMs in flight."""
        return 6.0 if self.quick else 12.0

    @property
    def fanin_warmup_s(self) -> float:
        """Unmeasured seconds before each fan-in round's window."""
        return 2.0 if self.quick else 4.0

    @property
    def storm_vms(self) -> int:
        """VMs that boot at once in the boot storm."""
        return 2_000 if self.quick else 10_000

    @property
    def throughput_s(self) -> float:
        """Measured seconds of each throughput round (after a warm-up)."""
        return 2.0 if self.quick else 5.0

    @property
    def latency_s(self) -> float:
        """Seconds of each latency round."""
        return 2.0 if self.quick else 6.0

    @property
    def idle_s(self) -> float:
        """Seconds of each idle-CPU round (three rounds make the ~30 s)."""
        return 3.0 if self.quick else 10.0

    @property
    def scale_s(self) -> float:
        """Seconds of each scale throughput round."""
        return 2.0 if self.quick else 4.0


@dataclass
class Bench:
    """Runs everything; the figures and notes are read by the report."""

    stack: Stack
    work: Path
    settings: Settings
    figures: dict[str, Figure] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    profiles: dict[str, profile.Summary] = field(default_factory=dict)
    steady_fleet_rate: float = float("nan")
    """The fan-in's closed-loop rate at the storm's host count (nan: not measured)."""
    _services: list[ServiceProcess] = field(default_factory=list)

    def figure(self, key: str, name: str, unit: str, target: str = "") -> Figure:
        """The figure under ``key`` (created on first use, in table order)."""
        if key not in self.figures:
            self.figures[key] = Figure(name, unit, target=target)
        return self.figures[key]

    def say(self, text: str) -> None:
        """A progress line."""
        print(f"bench: {text}", flush=True)

    async def run_all(self) -> None:
        """Every benchmark; every process started here is stopped whatever happens."""
        kek = self.work / "keys" / "kek.key"
        kek.parent.mkdir(parents=True)
        generate_key_file(kek)
        create_private_key_file(store_sealing_key_file(self.work))
        self.redis = Redis.from_url(self.stack.redis.url)
        self.recorder = await PersistedRecorder.start(self.stack.rabbit.amqp_url)
        self.bus = await BusClient.connect(
            self.stack.rabbit.amqp_url, source="bench", origin="bench"
        )
        try:
            self.store = store_process(
                self.stack, self.work, kek, history_depth=self.settings.history_depth
            )
            self._services.append(self.store)
            await start_service(self.store)
            self.tpm = await content.real_tpm_state(self.work)
            if not self.tpm.manufactured:
                self.notes.append("swtpm_setup was not available: TPM content is random 6 KB.")
            if "pipeline" in self.settings.parts:
                await self.pipeline_benchmarks()
            if "idle" in self.settings.parts:
                await self.idle_benchmark()
            if {"scale", "storm"} & set(self.settings.parts):
                await self.scale_benchmarks()
            assert self.store.process is not None
            rss = rss_bytes(self.store.process.pid) / 2**20
            self.figure("store_rss", "State store RSS at the end", "MiB").add(rss)
            if "cluster" in self.settings.parts:  # last: it stops the store above
                await cluster.cluster_benchmarks(self)
        finally:
            for service in reversed(self._services):
                with contextlib.suppress(Exception):
                    await service.stop(10.0)
            with contextlib.suppress(Exception):
                await self.bus.close(2.0)
            with contextlib.suppress(Exception):
                await self.recorder.close()
            with contextlib.suppress(Exception):
                await self.redis.aclose()

    # --- 1, 2, 4: the real host agent and store -------------------------------------------

    async def pipeline_benchmarks(self) -> None:
        """Throughput against raw, latency, restore, and profiles, on one real host."""
        settings = self.settings
        host_id = "bench-h1"
        root = self.work / "hosts" / host_id
        vms = lay_out_host(root, settings.vms, epoch=1, tpm_state=os.urandom(TPM_SIZE))
        async with self.redis.pipeline(transaction=False) as pipe:
            for vm in vms:
                pipe.hset(placement_key(vm.vm_id), mapping={"host": host_id, "epoch": "1"})
            await pipe.execute()
        agent = agent_process(
            self.stack, self.work, host_id, root, window_s=settings.window_s, inline=settings.inline
        )
        self._services.append(agent)
        await start_service(agent)
        assert agent.process is not None
        assert self.store.process is not None
        began = time.monotonic()
        while self.recorder.count < 2 * len(vms):
            if time.monotonic() - began > 180:
                raise RuntimeError(
                    f"initial state of {len(vms)} VMs not persisted "
                    f"({self.recorder.count} events) in 180 s"
                )
            await asyncio.sleep(0.2)
        self.say(f"{len(vms)} VMs tracked and stored in {time.monotonic() - began:.1f} s")

        store_pid = self.store.process.pid
        for index in range(settings.rounds):
            for kind, size, label in SIZES:
                order = ["raw", "pipe"] if index % 2 == 0 else ["pipe", "raw"]
                measured: dict[str, float] = {}
                for which in order:
                    if which == "raw":
                        measured["raw"], raw_cpu = await raw.raw_round_trip(
                            self.stack.rabbit.amqp_url,
                            size,
                            settings.throughput_s,
                            lambda: self.cpu_of(self.stack.rabbit.pid(), os.getpid()),
                        )
                        self.figure(
                            f"cpu_raw_{kind}",
                            f"Raw CPU per message, {label} (bench client + broker)",
                            "ms",
                        ).add(1000 * raw_cpu)
                    else:
                        pids = self.path_pids(agent.process.pid, store_pid)
                        cpu_before = {who: self.cpu_of(pid) for who, pid in pids.items()}
                        persisted_before = self.recorder.count
                        rate, timeouts = await pipeline.throughput(
                            self.recorder, vms, kind, settings.throughput_s, tpm_size=TPM_SIZE
                        )
                        measured["pipe"] = rate
                        self.cpu_per_version(kind, label, pids, cpu_before, persisted_before)
                        if timeouts:
                            self.notes.append(
                                f"throughput {label} round {index + 1}: {timeouts} changes "
                                "not announced within 20 s"
                            )
                self.figure(f"raw_{kind}", f"Raw aio-pika round trip, {label}", "msg/s").add(
                    measured["raw"]
                )
                self.figure(
                    f"pipe_{kind}", f"Pipeline, {label} changes ({kind.upper()})", "versions/s"
                ).add(measured["pipe"])
                self.figure(f"ratio_{kind}", f"Pipeline / raw, {label}", "ratio").add(
                    measured["pipe"] / measured["raw"]
                )
                self.figure(
                    f"cpu_ratio_{kind}",
                    f"CPU per stored version / per raw message, {label}",
                    "ratio",
                    target="≤ 3" if kind == "tpm" else "",
                ).add(self.figures[f"cpu_all_{kind}"].rounds[-1] / (1000 * raw_cpu))
                if kind == "tpm":
                    await self.version_floor(raw_cpu)
                self.say(
                    f"round {index + 1} {label}: raw {measured['raw']:.0f}/s, "
                    f"pipeline {measured['pipe']:.0f}/s"
                )
        self.figure("store_rss_pipe", "State store RSS after the throughput runs", "MiB").add(
            rss_bytes(self.store.process.pid) / 2**20
        )

        window_ms = settings.window_s * 1000
        pooled: list[float] = []
        pooled_hop: list[float] = []
        hop_name = "Raw one hop (16 KiB publish → delivered, quorum queue)"
        for index in range(settings.rounds):
            # The one-hop floor and the pipeline's latency in turn, so that each round's
            # ratio compares two measurements made under the same load.
            hop = [
                1000 * sample
                for sample in await raw.raw_latency(self.stack.rabbit.amqp_url, TPM_SIZE, 100)
            ]
            pooled_hop += hop
            self.figure("hop_p50", f"{hop_name} p50", "ms").add(percentile(hop, 0.5))
            self.figure("hop_p99", f"{hop_name} p99", "ms").add(percentile(hop, 0.99))
            timed, timeouts = await pipeline.latency(
                self.recorder, vms, settings.latency_rate, settings.latency_s, tpm_size=TPM_SIZE
            )
            if timeouts:
                self.notes.append(f"latency round {index + 1}: {timeouts} changes timed out")
            pooled += [seconds for _, seconds in timed]
            beyond = [1000 * seconds - window_ms for _, seconds in timed]
            window = f"beyond the {window_ms:.0f} ms window"
            self.figure("lat_p50", f"Change → persisted p50, {window}", "ms").add(
                percentile(beyond, 0.5)
            )
            self.figure("lat_p99", f"Change → persisted p99, {window}", "ms").add(
                percentile(beyond, 0.99)
            )
            self.figure(
                "lat_hop_ratio", "Change → persisted p99 / raw one-hop p99", "ratio", target="≤ 4"
            ).add(percentile(beyond, 0.99) / percentile(hop, 0.99))
            for kind in ("tpm", "nvram"):
                mine = [1000 * seconds - window_ms for k, seconds in timed if k == kind]
                if mine:
                    self.figure(f"lat_{kind}_p50", f"… {kind.upper()} changes p50", "ms").add(
                        percentile(mine, 0.5)
                    )
                    self.figure(f"lat_{kind}_p99", f"… {kind.upper()} changes p99", "ms").add(
                        percentile(mine, 0.99)
                    )
            self.say(f"latency round {index + 1}: {len(timed)} changes timed")
        self.pooled_latency = [1000 * sample - window_ms for sample in pooled]
        self.pooled_hop = pooled_hop

        tpm_blob = seal_blob(
            StateKind.TPM,
            pack_tpm_state({MAIN_STATE_FILE_NAME: self.tpm.permall}),
            FencingToken(epoch=1, generation=1),
        )
        nvram_blob = seal_blob(
            StateKind.NVRAM, content.nvram_base(), FencingToken(epoch=1, generation=1)
        )
        for _ in range(settings.rounds):
            samples = await restore.prepare_calls(
                self.bus, host_id, root, tpm_blob, nvram_blob, settings.restore_calls
            )
            ms = [1000 * sample for sample in samples]
            self.figure("restore_p50", "Restore (vm.prepare → written, fsynced) p50", "ms").add(
                percentile(ms, 0.5)
            )
            self.figure(
                "restore_p99", "Restore (vm.prepare → written, fsynced) p99", "ms", target="< 20"
            ).add(percentile(ms, 0.99))

        await self.profile_pipeline(vms, agent)
        await agent.stop(10.0)
        shutil.rmtree(root, ignore_errors=True)

    def machine_pids(self) -> dict[str, int | None]:
        """The processes that share the machine's cores in the scale runs, by name."""
        assert self.store.process is not None
        return {
            "state store": self.store.process.pid,
            "RabbitMQ": self.stack.rabbit.pid(),
            "Redis": self.stack.redis.pid(),
            "simulated hosts (bench)": os.getpid(),
        }

    def cpu_of(self, *pids: int | None) -> float:
        """utime + stime of these processes together, in seconds."""
        return sum(cpu_seconds(pid) for pid in pids if pid is not None)

    async def version_floor(self, raw_cpu: float) -> None:
        """What a stored 16 KiB version costs at the least, in this round: the state's own
        message (a raw 16 KiB one), the small ``state.persisted`` that announces it (a raw
        message of its size) and Redis's durable write (as measured on the pipeline). What
        the 3x target leaves beyond that is the budget of everything the agent and the
        store do with the state (read, hash, compress, seal, open, verify, encrypt)."""
        _, small_cpu = await raw.raw_round_trip(
            self.stack.rabbit.amqp_url,
            PERSISTED_EVENT_SIZE,
            self.settings.throughput_s,
            lambda: self.cpu_of(self.stack.rabbit.pid(), os.getpid()),
        )
        self.figure(
            "cpu_raw_small",
            f"Raw CPU per message, {PERSISTED_EVENT_SIZE} bytes (a state.persisted)",
            "ms",
        ).add(1000 * small_cpu)
        floor_ms = 1000 * (raw_cpu + small_cpu) + self.figures["cpu_redis_tpm"].rounds[-1]
        self.figure(
            "cpu_floor_ratio",
            "Floor: both messages + Redis's write / raw message, 16 KiB",
            "ratio",
        ).add(floor_ms / (1000 * raw_cpu))
        self.figure(
            "cpu_beyond_floor",
            "CPU per stored 16 KiB version beyond that floor (agent and store work)",
            "ms",
        ).add(self.figures["cpu_all_tpm"].rounds[-1] - floor_ms)
        self.figure(
            "cpu_essential",
            "… of which hash, compress, seal, open, verify, encrypt at rest (timed alone)",
            "ms",
        ).add(1000 * essential.essential_cpu_per_version(TPM_SIZE))

    def path_pids(self, agent_pid: int, store_pid: int) -> dict[str, int | None]:
        """Every process a version passes through, by the name its figure carries: the
        services, the broker, Redis, and this process (it writes the changes and consumes
        the persisted events)."""
        return {
            "Host agent": agent_pid,
            "State store": store_pid,
            "RabbitMQ": self.stack.rabbit.pid(),
            "Redis": self.stack.redis.pid(),
            "Bench driver": os.getpid(),
        }

    def cpu_per_version(
        self,
        kind: str,
        label: str,
        pids: dict[str, int | None],
        cpu_before: dict[str, float],
        persisted_before: int,
    ) -> None:
        """CPU time of each process on the path per version persisted in a throughput run:
        what the pipeline costs, far less sensitive to other work on the machine than rates;
        their sum against the raw path's per message says where the throughput ratio goes."""
        versions = max(self.recorder.count - persisted_before, 1)
        total = 0.0
        for who, pid in pids.items():
            spent = 1000 * (self.cpu_of(pid) - cpu_before[who]) / versions
            total += spent
            key = f"cpu_{who.split()[-1].lower()}_{kind}"
            self.figure(key, f"{who} CPU per version, {label}", "ms").add(spent)
        self.figure(f"cpu_all_{kind}", f"All processes CPU per version, {label}", "ms").add(total)

    async def profile_pipeline(self, vms: list[BenchVm], agent: ServiceProcess) -> None:
        """One extra (untimed) saturated round per size under py-spy, store and agent."""
        if profile.py_spy() is None:
            self.notes.append("py-spy is not installed: no profile.")
            return
        assert agent.process is not None
        assert self.store.process is not None
        seconds = 3 if self.settings.quick else 6
        for kind in ("tpm", "nvram"):
            out_store = self.work / f"profile-store-{kind}.txt"
            out_agent = self.work / f"profile-agent-{kind}.txt"
            load = asyncio.create_task(
                pipeline.throughput(self.recorder, vms, kind, seconds + 1, tpm_size=TPM_SIZE)
            )
            await asyncio.sleep(1.0)
            ok_store, ok_agent = await asyncio.gather(
                profile.record(self.store.process.pid, out_store, seconds),
                profile.record(agent.process.pid, out_agent, seconds),
            )
            await load
            if ok_store:
                self.profiles[f"state store, {kind.upper()} changes"] = profile.summarise(out_store)
            if ok_agent:
                self.profiles[f"host agent, {kind.upper()} changes"] = profile.summarise(out_agent)
            if not (ok_store and ok_agent):
                self.notes.append(f"py-spy could not sample every process ({kind}).")

    # --- 3: idle --------------------------------------------------------------------------

    async def idle_benchmark(self) -> None:
        """One real agent, 1,000 domains, no changes, default rescan and heartbeat."""
        settings = self.settings
        host_id = "bench-idle"
        root = self.work / "hosts" / host_id
        lay_out_host(
            root, settings.idle_vms, epoch=0, tpm_state=self.tpm.permall, sparse_nvram=True
        )
        agent = agent_process(self.stack, self.work, host_id, root, window_s=0.5)
        self._services.append(agent)
        await start_service(agent, timeout_s=180)
        assert agent.process is not None
        settled = await idle.settle(agent.process.pid)
        self.say(f"idle agent settled after {settled:.0f} s")
        for _ in range(settings.rounds):
            share = await idle.cpu_share(agent.process.pid, settings.idle_s)
            self.figure(
                "idle_cpu",
                f"Idle host agent, {settings.idle_vms:,} VMs ({settings.idle_s:.0f} s rounds)",
                "% of a core",
                target="≤ ½ of before",
            ).add(share)
        if profile.py_spy() is not None:
            out = self.work / "profile-agent-idle.txt"
            if await profile.record(agent.process.pid, out, int(settings.idle_s)):
                self.profiles[f"host agent, idle, {settings.idle_vms:,} VMs"] = profile.summarise(
                    out
                )
        self.figure("idle_rss", f"Idle host agent RSS, {settings.idle_vms:,} VMs", "MiB").add(
            rss_bytes(agent.process.pid) / 2**20
        )
        await agent.stop(10.0)
        shutil.rmtree(root, ignore_errors=True)

    # --- 5: scale -------------------------------------------------------------------------

    async def scale_benchmarks(self) -> None:
        """The real store against 1, 10 and 100 simulated hosts (see bench.scale)."""
        pools = {
            StateKind.TPM: content.variants(StateKind.TPM, self.tpm.permall, 8, seed=1),
            StateKind.NVRAM: content.variants(StateKind.NVRAM, content.nvram_base(), 8, seed=2),
        }
        for kind, label in ((StateKind.TPM, "TPM"), (StateKind.NVRAM, "NVRAM")):
            sizes = [len(blob.compressed.get_secret_value()) for blob in pools[kind]]
            self.figure(
                f"blob_{kind.value}",
                f"Compressed {label} blob (raw {pools[kind][0].size:,} bytes)",
                "KB",
            ).add(sum(sizes) / len(sizes) / 1000)
        store_key = load_private_key(store_sealing_key_file(self.work)).public_key()
        hosts = await scale.FakeHosts.start(
            self.bus, pools, SealingPublicKey(store_key), self.settings.inline_budget
        )
        try:
            if "scale" in self.settings.parts:
                await self.scale_memory(hosts, 10)
                await self.fan_in(hosts)
            await self.boot_storm(hosts)
        finally:
            await hosts.close()

    async def fan_in(self, hosts: scale.FakeHosts) -> None:
        """The same VMs in flight spread over 1, 10, 100 and 1,000 simulated hosts; each
        round measures every host count (in a rotating order) and the ratios are taken
        within the round."""
        settings = self.settings
        both = [StateKind.TPM, StateKind.NVRAM]
        fleets: dict[int, list[scale.FakeVm]] = {}
        for count in settings.fanin_hosts:
            run = uuid.uuid4().hex[:4]
            host_ids = [f"bench-f{count}-{run}-{i}" for i in range(count)]
            await hosts.serve_fleet(f"f{count}-{run}", host_ids)
            vms = [
                scale.FakeVm(str(uuid.uuid4()), host_ids[i % count])
                for i in range(settings.fanin_vms)
            ]
            await scale.place(self.redis, vms)
            # The VMs' first versions (data keys, heads) are not what is measured.
            await scale.closed_loop(hosts, self.recorder, vms, both, duration_s=None, steps=2)
            fleets[count] = vms
        counts = list(settings.fanin_hosts)
        # Where the CPU of a version goes at each host count: the machine's cores are shared
        # by the store, the broker, Redis and the simulated hosts.
        pids = self.machine_pids()
        for index in range(settings.rounds):
            order = counts[index % len(counts) :] + counts[: index % len(counts)]
            rates: dict[int, float] = {}
            store_ms: dict[int, float] = {}
            all_ms: dict[int, float] = {}
            for count in order:
                hosts_s = "s" if count > 1 else ""
                cpu_before = {who: self.cpu_of(pid) for who, pid in pids.items()}
                events_before = (hosts.events_published, hosts.changes_published)
                began = time.monotonic()
                loop = await scale.closed_loop(
                    hosts,
                    self.recorder,
                    fleets[count],
                    both,
                    duration_s=settings.fanin_s,
                    warmup_s=settings.fanin_warmup_s,
                )
                wall_s = time.monotonic() - began
                all_spent = 0.0
                for who, pid in pids.items():
                    spent = self.cpu_of(pid) - cpu_before[who]
                    all_spent += spent
                    per_version_ms = 1000 * spent / max(loop.persisted, 1)
                    self.figure(
                        f"fanin_cpu_{count}_{who}",
                        f"CPU per version at {count:,} simulated host{hosts_s}: {who}",
                        "ms",
                    ).add(per_version_ms)
                    if who == "state store":
                        store_ms[count] = per_version_ms
                all_ms[count] = 1000 * all_spent / max(loop.persisted, 1)
                self.figure(
                    f"fanin_busy_{count}",
                    f"… the machine's CPUs busy at {count:,} simulated host{hosts_s}",
                    "%",
                ).add(100 * all_spent / (wall_s * (os.cpu_count() or 1)))
                events = hosts.events_published - events_before[0]
                self.figure(
                    f"fanin_per_event_{count}",
                    f"… versions per state.changed event at {count:,} simulated host{hosts_s}",
                    "versions",
                ).add((hosts.changes_published - events_before[1]) / max(events, 1))
                if loop.timeouts:
                    self.notes.append(f"fan-in {count} hosts: {loop.timeouts} changes timed out")
                rates[count] = loop.persisted_in_time / loop.seconds
                self.figure(
                    f"fanin_{count}",
                    f"Store throughput, {count:,} simulated host{hosts_s} "
                    f"x {settings.fanin_vms // count:,} VMs (TPM and NVRAM)",
                    "versions/s",
                ).add(rates[count])
            for count in counts[1:]:
                self.figure(
                    f"fanin_ratio_{count}",
                    f"Fan-in: {count:,} hosts / 1 host, same {settings.fanin_vms:,} VMs",
                    "ratio",
                    target="≥ 0.9" if count >= 1000 else "≥ 0.95",
                ).add(rates[count] / rates[counts[0]])
                # With the machine as busy at both counts, the throughput ratio is this one.
                self.figure(
                    f"fanin_all_cpu_ratio_{count}",
                    f"… every process's CPU per version: 1 host / {count:,} hosts",
                    "ratio",
                ).add(all_ms[counts[0]] / all_ms[count])
            # The store's own part of the fan-in: what an operator sizing replicas pays per
            # version, apart from the broker's and the simulated hosts' per-event CPU, which
            # share this machine's cores but not a fleet's.
            self.figure(
                "fanin_store_cpu_ratio",
                f"Fan-in, the store's own CPU per version: 1 host / {counts[-1]:,} hosts",
                "ratio",
            ).add(store_ms[counts[0]] / store_ms[counts[-1]])
            await self.consume_floors(store_ms[counts[0]])
            self.say(
                f"fan-in round {index + 1}: " + ", ".join(f"{c}: {rates[c]:.0f}/s" for c in counts)
            )
        for count in (counts[0], counts[-1]):
            await self.profile_fan_in(hosts, fleets[count], both)
        self.steady_fleet_rate = (
            self.figures[f"fanin_{settings.storm_hosts}"].median
            if f"fanin_{settings.storm_hosts}" in self.figures
            else float("nan")
        )

    async def consume_floors(self, store_ms_one_host: float) -> None:
        """aio-pika's own CPU per message consumed (see bench.consume_floor), and what it
        leaves of the fan-in's store ratio at one event per version: its 1-host CPU per
        version against that plus the floor, were the store's own per-event work free."""
        settings = self.settings
        for ack_every, how in ((1, "one acknowledgement each"), (64, "one per 64")):
            floor_ms = await consume_floor.consume_floor(
                self.stack.rabbit.amqp_url,
                FLOOR_EVENT_SIZE,
                2000 if settings.quick else 5000,
                prefetch=1024,
                ack_every=ack_every,
            )
            self.figure(
                f"floor_consume_{ack_every}",
                f"aio-pika alone: CPU per 4 KiB message consumed, {how}",
                "ms",
            ).add(floor_ms)
            self.figure(
                f"fanin_ceiling_{ack_every}",
                f"… the store's own fan-in ratio at {settings.fanin_hosts[-1]:,} hosts at "
                f"best, {how}: 1-host CPU per version / (that + the above)",
                "ratio",
            ).add(store_ms_one_host / (store_ms_one_host + floor_ms))

    async def profile_fan_in(
        self, hosts: scale.FakeHosts, vms: list[scale.FakeVm], kinds: list[StateKind]
    ) -> None:
        """One extra (untimed) closed-loop round of a fleet with the store under py-spy: the
        narrowest and the widest fleet's side by side show where the per-event work of many
        small hosts goes."""
        if profile.py_spy() is None or self.store.process is None:
            return
        count = len({vm.host for vm in vms})
        seconds = 3 if self.settings.quick else 6
        out = self.work / f"profile-store-fanin-{count}.txt"
        load = asyncio.create_task(
            scale.closed_loop(
                hosts, self.recorder, vms, kinds, duration_s=seconds + 2, warmup_s=0.0
            )
        )
        await asyncio.sleep(1.0)
        if await profile.record(self.store.process.pid, out, seconds):
            self.profiles[f"state store, fan-in from {count:,} host{'s' if count > 1 else ''}"] = (
                profile.summarise(out, top=20)
            )
        await load

    async def profile_storm(self) -> None:
        """The store under py-spy through the storm's first seconds (the storm runs in a
        task of its own meanwhile)."""
        if profile.py_spy() is None or self.store.process is None:
            return
        out = self.work / "profile-store-storm.txt"
        if await profile.record(self.store.process.pid, out, 10 if self.settings.quick else 30):
            self.profiles["state store, boot storm"] = profile.summarise(out, top=20)

    async def boot_storm(self, hosts: scale.FakeHosts) -> None:
        """10,000 VMs on 100 simulated hosts boot at once (see bench.storm); one round."""
        settings = self.settings
        run = uuid.uuid4().hex[:4]
        host_ids = [f"bench-b-{run}-{i}" for i in range(settings.storm_hosts)]
        await hosts.serve_fleet(f"b-{run}", host_ids)
        vms = [
            scale.FakeVm(str(uuid.uuid4()), host_ids[i % len(host_ids)])
            for i in range(settings.storm_vms)
        ]
        await scale.place(self.redis, vms)
        # A power cut or a maintenance window reboots VMs that ran before: each has a stored
        # TPM and NVRAM (made here, not measured), as in the steady loop it is compared with.
        await scale.closed_loop(
            hosts, self.recorder, vms, [StateKind.TPM, StateKind.NVRAM], duration_s=None, steps=2
        )
        assert self.store.process is not None
        pids = self.machine_pids()
        cpu_before = {who: self.cpu_of(pid) for who, pid in pids.items()}
        began = time.monotonic()
        storming = asyncio.create_task(
            storm.boot_storm(hosts, self.recorder, vms, wait_s=STORM_WAIT_S)
        )
        await self.profile_storm()
        summary = await storming
        wall_s = time.monotonic() - began
        cpu = {who: self.cpu_of(pid) - cpu_before[who] for who, pid in pids.items()}
        label = (
            f"{summary.vms:,} VMs on {summary.hosts} hosts, {len(storm.BOOT_WRITES)} writes each"
        )
        self.figure("storm_all", f"Boot storm ({label}): every newest state stored", "s").add(
            summary.all_stored_s
        )
        self.figure(
            "storm_rate", "… versions stored per second during the storm", "versions/s"
        ).add(summary.stored_per_s)
        self.figure(
            "storm_vs_steady",
            f"… storm rate / steady closed loop at {settings.storm_hosts} hosts",
            "ratio",
            target="≥ 0.9",
        ).add(summary.stored_per_s / self.steady_fleet_rate)
        self.figure(
            "storm_finished", "… VMs whose newest TPM and NVRAM were stored in time", "VMs"
        ).add(summary.vms - summary.unfinished)
        self.figure("storm_median", "… median VM (of those): newest state stored after", "s").add(
            summary.median_vm_s
        )
        self.figure("storm_slowest", "… slowest VM / median VM", "ratio", target="≤ 2").add(
            summary.slowest_over_median
        )
        self.figure("storm_hosts", "… slowest host's median VM / fastest host's", "ratio").add(
            summary.host_median_spread
        )
        self.figure("storm_rpo_p50", "… recovery point per write p50", "s").add(
            summary.exposure_p50_s
        )
        self.figure("storm_rpo_p99", "… recovery point per write p99", "s").add(
            summary.exposure_p99_s
        )
        self.figure("storm_rpo_max", "… recovery point per write max", "s").add(
            summary.exposure_max_s
        )
        for who, seconds in cpu.items():
            self.figure(f"storm_cpu_{who}", f"… CPU per version stored: {who}", "ms").add(
                1000 * seconds / max(summary.versions_stored, 1)
            )
        # Whether the storm had the machine to itself: the store, the broker, Redis and the
        # simulated hosts share its cores, so a rate below the steady one with every core
        # busy is the machine's limit, not the store's.
        self.figure("storm_busy", "… the machine's CPUs busy during the storm", "%").add(
            100 * sum(cpu.values()) / (wall_s * (os.cpu_count() or 1))
        )
        if summary.unfinished:
            self.notes.append(
                f"boot storm: {summary.unfinished} VMs' newest state not stored within "
                f"{STORM_WAIT_S:.0f} s (the simulated hosts send no heartbeats, so an event "
                "dead-lettered after its delivery limit is not reconciled as on a real host)"
            )
        self.say(
            f"boot storm: {summary.writes:,} writes, {summary.versions_stored:,} versions, "
            f"{summary.vms - summary.unfinished:,} VMs finished, all stored after "
            f"{summary.all_stored_s:.1f} s"
        )

    async def scale_memory(self, hosts: scale.FakeHosts, count: int) -> None:
        """Redis memory per VM and per version: fresh VMs each round, over ``count``
        simulated hosts (each with its own command queue, as in production)."""
        settings = self.settings
        both = [StateKind.TPM, StateKind.NVRAM]
        run = uuid.uuid4().hex[:4]
        host_ids = [f"bench-s{count}-{run}-{i}" for i in range(count)]
        vms = [scale.FakeVm(str(uuid.uuid4()), host_ids[i % count]) for i in range(settings.vms)]
        await hosts.serve(host_ids)
        await scale.place(self.redis, vms)
        for _ in range(settings.rounds):
            before = await scale.used_memory(self.redis)
            fresh = [scale.FakeVm(str(uuid.uuid4()), vm.host) for vm in vms]
            await scale.place(self.redis, fresh)
            await scale.closed_loop(hosts, self.recorder, fresh, both, duration_s=None, steps=2)
            self.figure(
                "mem_vm", "Redis memory per VM (placement, key, heads, first TPM + NVRAM)", "KB"
            ).add((await scale.used_memory(self.redis) - before) / len(fresh) / 1000)
            per_kind = {}
            for kind in both:
                before = await scale.used_memory(self.redis)
                loop = await scale.closed_loop(
                    hosts, self.recorder, fresh, [kind], duration_s=settings.scale_s / 2
                )
                stored = await scale.used_memory(self.redis) - before
                per_kind[kind] = stored / max(loop.persisted, 1)
            self.figure(
                "mem_version",
                "Redis memory per stored version of TPM + NVRAM",
                "KB",
                target="< 8",
            ).add(sum(per_kind.values()) / 1000)
            self.figure("mem_tpm", "… of which TPM (manufactured swtpm state)", "KB").add(
                per_kind[StateKind.TPM] / 1000
            )
            self.figure("mem_nvram", "… of which NVRAM (OVMF VARS, 540 KiB)", "KB").add(
                per_kind[StateKind.NVRAM] / 1000
            )
        self.say(f"scale memory done ({hosts.fetches} fetches so far)")
