"""The whole pipeline through the real host agent and store: a change written on disk →
inotify → stable read → ``state.changed`` → batched fetch → verify → encrypt → fenced
durable write → ack → ``state.persisted``."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import time
from collections.abc import Sequence

from bench.env import PersistedRecorder
from bench.hosts import NVRAM_WRITE_SIZE, BenchVm

WAIT_S = 20.0


def change(vm: BenchVm, kind: str, rng: random.Random, tpm_size: int) -> str:
    """One change of the VM's TPM (new random state) or NVRAM (64 bytes in place)."""
    if kind == "tpm":
        return vm.write_tpm(os.urandom(tpm_size))
    offset = rng.randrange(0, len(vm.nvram) - NVRAM_WRITE_SIZE)
    return vm.write_nvram(offset, os.urandom(NVRAM_WRITE_SIZE))


async def throughput(
    recorder: PersistedRecorder,
    vms: Sequence[BenchVm],
    kind: str,
    duration_s: float,
    *,
    tpm_size: int = 16 * 1024,
) -> tuple[float, int]:
    """Closed loop: every VM changes again as soon as its previous change was announced
    persisted. Returns (persisted versions per second in the window, timeouts)."""
    started = time.monotonic() + 1.0  # one second of warm-up
    ends = started + duration_s
    done = 0
    timeouts = 0

    async def one_vm(vm: BenchVm, seed: int) -> None:
        nonlocal done, timeouts
        rng = random.Random(seed)
        await asyncio.sleep(rng.uniform(0, 0.2))
        while time.monotonic() < ends:
            digest = change(vm, kind, rng, tpm_size)
            future = recorder.expect(vm.vm_id, digest)
            try:
                at = await asyncio.wait_for(future, WAIT_S)
            except TimeoutError:
                timeouts += 1
                recorder.forget(vm.vm_id, digest)
                continue
            if started <= at < ends:
                done += 1

    await asyncio.gather(*(one_vm(vm, index) for index, vm in enumerate(vms)))
    return done / duration_s, timeouts


async def latency(
    recorder: PersistedRecorder,
    vms: Sequence[BenchVm],
    rate_per_s: float,
    duration_s: float,
    *,
    tpm_size: int = 16 * 1024,
) -> tuple[list[tuple[str, float]], int]:
    """Open loop at ``rate_per_s`` changes/s over the VMs in turn (TPM and NVRAM alternating
    per VM); returns each change's kind and time from the write to its persisted event, and the
    number that timed out."""
    rng = random.Random(7)
    samples: list[tuple[str, float]] = []
    timeouts = 0
    pending: list[asyncio.Task[None]] = []

    async def measure(
        vm: BenchVm, kind: str, written_at: float, future: asyncio.Future[float], digest: str
    ) -> None:
        nonlocal timeouts
        try:
            at = await asyncio.wait_for(future, WAIT_S)
        except TimeoutError:
            timeouts += 1
            recorder.forget(vm.vm_id, digest)
            return
        samples.append((kind, at - written_at))

    interval = 1.0 / rate_per_s
    count = int(duration_s * rate_per_s)
    kinds = {vm.vm_id: rng.choice(["tpm", "nvram"]) for vm in vms}
    next_at = time.monotonic()
    for index in range(count):
        vm = vms[index % len(vms)]
        kind = kinds[vm.vm_id]
        kinds[vm.vm_id] = "nvram" if kind == "tpm" else "tpm"
        delay = next_at - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        next_at += interval
        written_at = time.monotonic()
        digest = change(vm, kind, rng, tpm_size)
        future = recorder.expect(vm.vm_id, digest)
        pending.append(asyncio.create_task(measure(vm, kind, written_at, future, digest)))
    with contextlib.suppress(Exception):
        await asyncio.gather(*pending)
    return samples, timeouts
