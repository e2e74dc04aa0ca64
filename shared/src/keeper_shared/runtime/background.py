"""Tasks a service starts and does not await: kept, logged when they fail, cancelled on stop.

asyncio keeps only a weak reference to a task, so a task nobody holds can be collected
mid-flight; and an exception in a task nobody awaits is reported only when it is collected,
if ever. Every fire-and-forget task of a service goes through one of these instead.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine
from typing import Any

import structlog

log = structlog.get_logger(__name__)


class BackgroundTasks:
    """A set of running tasks, each one logged as ``failure_event`` if it raises."""

    def __init__(self, failure_event: str) -> None:
        """``failure_event`` is the log line of a task that raised (what the tasks do)."""
        self._failure_event = failure_event
        self._tasks: set[asyncio.Task[None]] = set()

    def spawn(self, coroutine: Coroutine[Any, Any, None], *, name: str | None = None) -> None:
        """Run ``coroutine`` in a task of its own, held until it ends."""
        task = asyncio.create_task(coroutine, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def __len__(self) -> int:
        return len(self._tasks)

    async def cancel_all(self) -> None:
        """Cancel every task still running and wait until each has ended."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        # Their done callbacks run on the loop's next turn; ended is ended now.
        self._tasks.difference_update(tasks)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error(self._failure_event, exc_info=task.exception())
