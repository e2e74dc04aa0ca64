"""Small work runs in the event loop, large work in a worker thread."""

from __future__ import annotations

import threading

from keeper_shared.runtime.cpu_work import INLINE_LIMIT, run_sized


def _thread_of(_data: bytes) -> int:
    return threading.get_ident()


async def test_small_work_runs_in_the_event_loop_thread() -> None:
    ran_in = await run_sized(INLINE_LIMIT, _thread_of, b"x" * INLINE_LIMIT)

    assert ran_in == threading.get_ident()


async def test_large_work_runs_in_a_worker_thread() -> None:
    ran_in = await run_sized(INLINE_LIMIT + 1, _thread_of, b"x" * (INLINE_LIMIT + 1))

    assert ran_in != threading.get_ident()
