"""The raw limit: aio-pika publish (persistent, publisher confirms) → consume → ack of bodies
of a given size through a quorum queue on the same broker, as many in flight as the pipeline
has VMs changing at once."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import Callable
from typing import Any

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

QUORUM_QUEUE: dict[str, Any] = {"x-queue-type": "quorum", "x-delivery-limit": 5}
"""The raw paths' queues: quorum queues, as the services' are."""


async def raw_round_trip(
    amqp_url: str,
    body_size: int,
    duration_s: float,
    cpu_seconds: Callable[[], float],
    in_flight: int = 64,
) -> tuple[float, float]:
    """Messages per second consumed and acknowledged during ``duration_s``, and the CPU
    seconds per message that ``cpu_seconds`` (a clock of the processes on the path) counted
    meanwhile."""
    queue_name = f"bench.raw.{uuid.uuid4().hex[:8]}"
    publisher = await aio_pika.connect_robust(amqp_url, timeout=30)
    consumer = await aio_pika.connect_robust(amqp_url, timeout=30)
    body = os.urandom(body_size)
    consumed = 0
    window: list[float] = []
    try:
        pub_channel = await publisher.channel(publisher_confirms=True)
        await pub_channel.declare_queue(queue_name, durable=True, arguments=QUORUM_QUEUE)
        sub_channel = await consumer.channel()
        await sub_channel.set_qos(prefetch_count=in_flight)
        queue = await sub_channel.declare_queue(queue_name, durable=True, arguments=QUORUM_QUEUE)
        counting = False

        async def on_message(message: AbstractIncomingMessage) -> None:
            nonlocal consumed
            await message.ack()
            if counting:
                consumed += 1

        tag = await queue.consume(on_message)
        stop_at = time.monotonic() + 0.5 + duration_s

        async def publish_forever() -> None:
            while time.monotonic() < stop_at:
                await pub_channel.default_exchange.publish(
                    aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                    routing_key=queue_name,
                )

        publishers = [asyncio.create_task(publish_forever()) for _ in range(in_flight)]
        await asyncio.sleep(0.5)  # warm up
        counting = True
        window.append(time.monotonic())
        cpu_before = cpu_seconds()
        await asyncio.sleep(duration_s)
        counting = False
        window.append(time.monotonic())
        cpu_spent = cpu_seconds() - cpu_before
        await asyncio.gather(*publishers)
        await queue.cancel(tag)
        await queue.delete(if_unused=False, if_empty=False)
    finally:
        await publisher.close()
        await consumer.close()
    return consumed / (window[1] - window[0]), cpu_spent / max(consumed, 1)


async def raw_latency(amqp_url: str, body_size: int, count: int) -> list[float]:
    """One message at a time: publish (confirmed) → delivered to a consumer, in seconds; the
    floor of one hop through a quorum queue, which the pipeline makes four times."""
    queue_name = f"bench.rawlat.{uuid.uuid4().hex[:8]}"
    connection = await aio_pika.connect_robust(amqp_url, timeout=30)
    samples: list[float] = []
    try:
        channel = await connection.channel(publisher_confirms=True)
        queue = await channel.declare_queue(queue_name, durable=True, arguments=QUORUM_QUEUE)
        arrived: asyncio.Queue[float] = asyncio.Queue()

        async def on_message(message: AbstractIncomingMessage) -> None:
            arrived.put_nowait(time.monotonic())
            await message.ack()

        tag = await queue.consume(on_message)
        body = os.urandom(body_size)
        for _ in range(count):
            began = time.monotonic()
            await channel.default_exchange.publish(
                aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                routing_key=queue_name,
            )
            samples.append(await asyncio.wait_for(arrived.get(), 10) - began)
            await asyncio.sleep(0.02)  # the pipeline's light load: 50 a second
        await queue.cancel(tag)
        await queue.delete(if_unused=False, if_empty=False)
    finally:
        await connection.close()
    return samples
