"""What every service runs beside its work: health endpoints and the dead-letter watcher."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from redis.asyncio import Redis

from keeper_shared.observability.dead_letters import watch_dead_letters
from keeper_shared.observability.server import ReadinessCheck, serve_observability

if TYPE_CHECKING:  # the bus client counts into this package's metrics: no import cycle
    from keeper_shared.bus.client import BusClient


@contextlib.asynccontextmanager
async def observe_service(
    bus: BusClient, dead_letter_queues: list[str], redis: Redis | None = None
) -> AsyncIterator[None]:
    """For the block: /healthz, /readyz (RabbitMQ connected, Redis answering when given)
    and /metrics when ``KEEPER_METRICS_PORT`` is set, and the depth of these DLQs watched."""

    async def bus_connected() -> bool:
        return not bus.connection.is_closed

    checks: dict[str, ReadinessCheck] = {"rabbitmq": bus_connected}
    if redis is not None:
        client = redis

        async def redis_answers() -> bool:
            return bool(await client.ping())

        checks["redis"] = redis_answers
    watcher = asyncio.create_task(watch_dead_letters(bus.connection, dead_letter_queues))
    try:
        async with serve_observability(checks=checks):
            yield
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
