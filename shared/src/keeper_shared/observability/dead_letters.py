"""Poll the depth of dead-letter queues into :data:`DEAD_LETTER_QUEUE_DEPTH`."""

from __future__ import annotations

import asyncio
import contextlib

import structlog
from aio_pika.abc import AbstractRobustConnection

from keeper_shared.observability.metrics import DEAD_LETTER_QUEUE_DEPTH

log = structlog.get_logger(__name__)


async def watch_dead_letters(
    connection: AbstractRobustConnection, queues: list[str], *, interval_s: float = 30.0
) -> None:
    """Every ``interval_s``, passively declare each DLQ and record its message count.
    Runs until cancelled; a queue that does not exist (yet) is skipped."""
    while True:
        for name in queues:
            try:
                channel = await connection.channel()
                try:
                    queue = await channel.declare_queue(name, passive=True)
                    count = queue.declaration_result.message_count
                    DEAD_LETTER_QUEUE_DEPTH.labels(queue=name).set(count or 0)
                finally:
                    with contextlib.suppress(Exception):
                        await channel.close()
            except asyncio.CancelledError:
                raise
            except Exception as error:  # missing queue, broker restarting: try next time
                log.debug("dead-letter queue not polled", queue=name, reason=type(error).__name__)
            _raise_if_cancelled()
        await asyncio.sleep(interval_s)


def _raise_if_cancelled() -> None:
    """End the task if it was cancelled while aio-pika swallowed the CancelledError.

    Cancelled while it opened or closed a channel, the watcher went on to sleep and poll
    for ever, and a service waiting for it on SIGTERM hung (a store at start-up, until it
    was killed). The task still counts the cancellation it never saw."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
