"""Fire-and-forget tasks are held until they end, a failure is logged, and cancelling
waits for every one (the host agent's lifecycle handling, policy's loops)."""

from __future__ import annotations

import asyncio

from structlog.testing import capture_logs

from keeper_shared.runtime.background import BackgroundTasks


async def wait_for(event: asyncio.Event) -> None:
    await event.wait()


async def test_a_task_is_held_until_it_ends() -> None:
    tasks = BackgroundTasks("failed")
    release = asyncio.Event()
    tasks.spawn(wait_for(release))
    await asyncio.sleep(0)
    assert len(tasks) == 1
    release.set()
    await asyncio.sleep(0.01)
    assert len(tasks) == 0


async def test_a_failure_is_logged_with_the_given_event() -> None:
    async def broken() -> None:
        raise RuntimeError("boom")

    tasks = BackgroundTasks("lifecycle handling failed")
    with capture_logs() as logs:
        tasks.spawn(broken())
        await asyncio.sleep(0.01)
    assert [entry["event"] for entry in logs] == ["lifecycle handling failed"]
    assert len(tasks) == 0


async def test_cancel_all_ends_every_running_task() -> None:
    tasks = BackgroundTasks("failed")
    forever = [asyncio.Event() for _ in range(3)]
    for event in forever:
        tasks.spawn(wait_for(event))
    await asyncio.sleep(0)
    with capture_logs() as logs:
        await tasks.cancel_all()
    assert len(tasks) == 0
    assert logs == []  # a cancelled task is no failure
