"""Idle cost: CPU of one real host agent tracking 1,000 domains that do not change."""

from __future__ import annotations

import asyncio
import time

from bench.env import cpu_seconds


async def settle(pid: int, *, quiet_fraction: float = 0.05, timeout_s: float = 120.0) -> float:
    """Wait until the agent's start-up reads are done (CPU under ``quiet_fraction`` of a core
    over 2 s); returns how long that took."""
    began = time.monotonic()
    while time.monotonic() - began < timeout_s:
        before = cpu_seconds(pid)
        await asyncio.sleep(2.0)
        if (cpu_seconds(pid) - before) / 2.0 < quiet_fraction:
            break
    return time.monotonic() - began


async def cpu_share(pid: int, seconds: float) -> float:
    """Share of one core the process used over ``seconds`` (utime + stime), in percent."""
    before_cpu, before = cpu_seconds(pid), time.monotonic()
    await asyncio.sleep(seconds)
    return 100.0 * (cpu_seconds(pid) - before_cpu) / (time.monotonic() - before)
