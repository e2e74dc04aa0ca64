"""Boot storm: thousands of VMs on many simulated hosts write their TPM and NVRAM at once.

After a power cut or a maintenance window every VM of a fleet boots together, and each boot
writes its TPM and its NVRAM several times within a second or two. Each (simulated) host
announces a state as its agent does: once it has been unchanged for the agent's stability
window (writes closer together than that are announced once, as the newest); nobody waits
for a state to be stored before the VM writes again. What an operator asks: how long until
every VM's newest state is stored, how much the store does meanwhile against its steady
rate, whether some VM or some host waits much longer than the rest, and how old the stored
state of a VM may be at any moment during the storm (the recovery point: what a host lost
right then would cost).

`summarise` is the arithmetic over what was written and what was announced persisted, kept
apart from the run so that it can be tested on its own.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from bench.env import PersistedRecorder
from bench.scale import FakeHosts, FakeVm
from bench.stats import percentile
from keeper_shared.messages.types import StateKind

BOOT_WRITES = (StateKind.TPM, StateKind.NVRAM, StateKind.TPM, StateKind.NVRAM, StateKind.TPM)
"""What one boot writes, in order: the firmware's variables and the TPM, several times."""
BOOT_GAP_S = (0.0, 0.2)
"""Pause between one VM's writes (uniform): a boot's writes are spread over about a second."""
STABILITY_WINDOW_S = 0.5
"""The host agent's default ``stability_window_s``: it announces a state once two reads this
far apart agree."""


@dataclass(frozen=True)
class Write:
    """One state write during the storm."""

    at: float
    vm_id: str
    host: str
    kind: StateKind
    content_hash: str
    generation: int


@dataclass(frozen=True)
class StormSummary:
    """What the storm showed; times in seconds from its start."""

    vms: int
    hosts: int
    writes: int
    versions_stored: int
    observed_s: float
    """From the start to the last version stored: the divisor of the storm's rate."""
    unfinished: int
    """VMs whose newest state of some kind was not stored when the bench stopped waiting."""
    all_stored_s: float
    """Until every VM's newest state was stored; nan when some never was."""
    median_vm_s: float
    slowest_vm_s: float
    """Among the VMs that finished (all of them unless ``unfinished``)."""
    host_median_spread: float
    """Slowest host's median VM against the fastest host's (1.0: every host alike)."""
    slowest_host_median_s: float
    """The median VM of the host whose VMs waited longest (a starved host shows here)."""
    exposure_p50_s: float
    exposure_p99_s: float
    exposure_max_s: float
    """Per write: how long until a version at least as new was stored (the recovery point
    a host lost at that moment would have left)."""

    @property
    def stored_per_s(self) -> float:
        """Versions the store wrote per second of the storm."""
        return self.versions_stored / max(self.observed_s, 1e-9)

    @property
    def slowest_over_median(self) -> float:
        """The slowest VM's wait against the median VM's (goal: at most 2)."""
        return self.slowest_vm_s / max(self.median_vm_s, 1e-9)


def summarise(
    writes: Sequence[Write],
    persisted: Sequence[tuple[float, str, str]],
    started: float,
) -> StormSummary:
    """The storm's figures from every write and every ``(arrival, vm_id, content_hash)`` of
    ``state.persisted`` seen after ``started``."""
    if not writes:
        raise ValueError("no writes")
    generation_of: dict[tuple[str, str], tuple[StateKind, int]] = {}
    host_of: dict[str, str] = {}
    for write in writes:
        generation_of[(write.vm_id, write.content_hash)] = (write.kind, write.generation)
        host_of[write.vm_id] = write.host
    # Per VM and kind, the stored generations in arrival order.
    stored: dict[tuple[str, StateKind], list[tuple[float, int]]] = defaultdict(list)
    versions = 0
    last = started
    for arrived, vm_id, digest in sorted(persisted):
        known = generation_of.get((vm_id, digest))
        if known is None:
            continue  # not a storm write (an earlier state of another scenario)
        versions += 1
        last = max(last, arrived)
        kind, generation = known
        stored[(vm_id, kind)].append((arrived, generation))

    def covered_at(vm_id: str, kind: StateKind, generation: int, after: float) -> float | None:
        for arrived, stored_generation in stored.get((vm_id, kind), []):
            if arrived >= after and stored_generation >= generation:
                return arrived
        return None

    done: dict[str, float] = {}
    unfinished: set[str] = set()
    for write in _newest(writes):
        at = covered_at(write.vm_id, write.kind, write.generation, write.at)
        if at is None:
            unfinished.add(write.vm_id)
        else:
            done[write.vm_id] = max(done.get(write.vm_id, 0.0), at - started)
    for vm_id in unfinished:
        done.pop(vm_id, None)
    exposures = []
    for write in writes:
        at = covered_at(write.vm_id, write.kind, write.generation, write.at)
        if at is not None:
            exposures.append(at - write.at)
    by_host: dict[str, list[float]] = defaultdict(list)
    for vm_id, seconds in done.items():
        by_host[host_of[vm_id]].append(seconds)
    host_medians = [statistics.median(times) for times in by_host.values()]
    finished = list(done.values()) or [float("nan")]
    return StormSummary(
        vms=len(host_of),
        hosts=len(set(host_of.values())),
        writes=len(writes),
        versions_stored=versions,
        observed_s=last - started,
        unfinished=len(unfinished),
        all_stored_s=float("nan") if unfinished else max(finished),
        median_vm_s=statistics.median(finished),
        slowest_vm_s=max(finished),
        host_median_spread=(
            max(host_medians) / max(min(host_medians), 1e-9) if host_medians else float("nan")
        ),
        slowest_host_median_s=max(host_medians, default=float("nan")),
        exposure_p50_s=percentile(exposures, 0.5) if exposures else float("nan"),
        exposure_p99_s=percentile(exposures, 0.99) if exposures else float("nan"),
        exposure_max_s=max(exposures) if exposures else float("nan"),
    )


async def boot_storm(
    hosts: FakeHosts,
    recorder: PersistedRecorder,
    vms: Sequence[FakeVm],
    *,
    wait_s: float,
    seed: int = 11,
) -> StormSummary:
    """Every VM boots at once (`BOOT_WRITES`, `BOOT_GAP_S` apart); returns once every VM's
    newest state is stored, or after ``wait_s``."""
    rng = random.Random(seed)
    gaps = {vm.vm_id: [rng.uniform(*BOOT_GAP_S) for _ in BOOT_WRITES] for vm in vms}
    writes: list[Write] = []
    seen: list[tuple[float, str, str]] = []
    recorder.listeners.append(seen.append)
    started = time.monotonic()

    last_write: dict[tuple[str, StateKind], float] = {}
    settling: dict[tuple[str, StateKind], asyncio.Task[None]] = {}

    async def announce_when_stable(vm: FakeVm, kind: StateKind) -> None:
        key = (vm.vm_id, kind)
        # A debounce: each write moves the deadline, so it is read again after each sleep.
        while (left := last_write[key] + STABILITY_WINDOW_S - time.monotonic()) > 0:  # noqa: ASYNC110
            await asyncio.sleep(left)
        del settling[key]
        await hosts.announce_current(vm, kind)

    async def boot(vm: FakeVm) -> None:
        for kind, gap in zip(BOOT_WRITES, gaps[vm.vm_id], strict=True):
            await asyncio.sleep(gap)
            at = time.monotonic()
            blob = hosts.write(vm, kind)
            writes.append(
                Write(at, vm.vm_id, vm.host, kind, blob.content_hash, blob.token.generation)
            )
            last_write[(vm.vm_id, kind)] = at
            if (vm.vm_id, kind) not in settling:
                settling[(vm.vm_id, kind)] = asyncio.create_task(announce_when_stable(vm, kind))

    try:
        await asyncio.gather(*(boot(vm) for vm in vms))
        while settling:
            await asyncio.gather(*settling.values())
        newest = {(w.vm_id, w.content_hash) for w in _newest(writes)}
        deadline = started + wait_s
        while time.monotonic() < deadline:
            arrived = {(vm_id, digest) for _, vm_id, digest in seen}
            if newest <= arrived:
                break
            await asyncio.sleep(0.1)
    finally:
        recorder.listeners.remove(seen.append)
    return summarise(writes, seen, started)


def _newest(writes: Sequence[Write]) -> list[Write]:
    newest: dict[tuple[str, StateKind], Write] = {}
    for write in writes:
        key = (write.vm_id, write.kind)
        if key not in newest or write.generation > newest[key].generation:
            newest[key] = write
    return list(newest.values())
