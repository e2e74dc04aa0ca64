"""The dead-letter depth watcher every service runs stops when cancelled, wherever it is.

A service cancels it on SIGTERM and waits for it. Cancelled while aio-pika opened or closed
a channel, it used to swallow the cancellation and poll on for ever, and the service hung
until it was killed (seen once: a store stopped right after it became ready).
"""

from __future__ import annotations

import asyncio
import random
import uuid

import aio_pika
import pytest

from keeper_shared.observability.dead_letters import watch_dead_letters

pytestmark = pytest.mark.rabbit

ROUNDS = 60
STOP_TIMEOUT_S = 5.0


async def test_a_watcher_cancelled_at_any_moment_ends(rabbitmq_url: str) -> None:
    connection = await aio_pika.connect_robust(rabbitmq_url)
    rng = random.Random(7)
    watched = f"keeper.test.dlq.{uuid.uuid4().hex[:8]}"
    try:
        setup = await connection.channel()
        # A quorum queue, as every dead-letter queue of the keeper is.
        await setup.declare_queue(watched, durable=True, arguments={"x-queue-type": "quorum"})
        for _ in range(ROUNDS):
            # One queue that exists, one that does not: both ways a poll can go.
            watcher = asyncio.create_task(
                watch_dead_letters(connection, [watched, watched, "keeper.test.no-such-dlq"])
            )
            await asyncio.sleep(rng.uniform(0, 0.01))
            watcher.cancel()
            done, _ = await asyncio.wait([watcher], timeout=STOP_TIMEOUT_S)
            assert done, "the watcher went on after it was cancelled"
            assert watcher.cancelled()
    finally:
        await connection.close()
        # On a connection of its own: the broker may just have closed the watcher's.
        async with await aio_pika.connect(rabbitmq_url) as cleanup:
            await (await cleanup.channel()).queue_delete(watched)
