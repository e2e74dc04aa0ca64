"""What aio-pika itself costs a consumer per message: deliver it and acknowledge it, in a
process of its own that does nothing else (``python -m bench.consume_floor``).

With a thousand hosts of one VM each, every version is an event of its own, so the store
pays this once per version where one host's events carry a hundred; the fan-in's store
ratio can be no better than its 1-host CPU per version against that plus this floor.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
import uuid

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

from bench.raw import QUORUM_QUEUE


async def consume_floor(
    amqp_url: str, body_size: int, count: int, prefetch: int, ack_every: int = 1
) -> float:
    """CPU milliseconds per message of a consumer process that only acknowledges ``count``
    messages of ``body_size`` bytes, queued before it starts, with ``prefetch`` in flight:
    each one on its own (``ack_every`` 1, as the services do), or every ``ack_every``-th
    with the ones before it (``multiple``)."""
    queue_name = f"bench.floor.{uuid.uuid4().hex[:8]}"
    connection = await aio_pika.connect_robust(amqp_url, timeout=30)
    try:
        channel = await connection.channel(publisher_confirms=True)
        queue = await channel.declare_queue(queue_name, durable=True, arguments=QUORUM_QUEUE)
        body = os.urandom(body_size)
        for first in range(0, count, 256):
            await asyncio.gather(
                *(
                    channel.default_exchange.publish(
                        aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                        routing_key=queue_name,
                    )
                    for _ in range(min(256, count - first))
                )
            )
        consumer = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bench.consume_floor",
            amqp_url,
            queue_name,
            str(count),
            str(prefetch),
            str(ack_every),
            stdout=asyncio.subprocess.PIPE,
        )
        out, _ = await asyncio.wait_for(consumer.communicate(), 120)
        if consumer.returncode != 0:
            raise RuntimeError(f"bench.consume_floor exited {consumer.returncode}")
        await queue.delete(if_unused=False, if_empty=False)
    finally:
        await connection.close()
    return float(out)


async def _acknowledge(
    amqp_url: str, queue_name: str, count: int, prefetch: int, ack_every: int
) -> float:
    connection = await aio_pika.connect_robust(amqp_url, timeout=30)
    try:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=prefetch)
        queue = await channel.get_queue(queue_name, ensure=False)
        all_acknowledged = asyncio.Event()
        acknowledged = 0
        # From the first delivery: connecting and the broker's first push are not per message.
        began: float | None = None

        async def on_message(message: AbstractIncomingMessage) -> None:
            nonlocal acknowledged, began
            if began is None:
                began = time.process_time()
            acknowledged += 1
            last = acknowledged == count
            if acknowledged % ack_every == 0 or last:
                await message.ack(multiple=ack_every > 1)
            if last:
                all_acknowledged.set()

        await queue.consume(on_message)
        await asyncio.wait_for(all_acknowledged.wait(), 100)
        assert began is not None
        return 1000 * (time.process_time() - began) / (count - 1)
    finally:
        await connection.close()


if __name__ == "__main__":
    url, name, how_many, in_flight, every = sys.argv[1:]
    print(asyncio.run(_acknowledge(url, name, int(how_many), int(in_flight), int(every))))
