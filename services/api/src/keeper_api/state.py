"""What one API process holds while it serves: its settings, tokens, its connection to the
bus as a :class:`KeeperClient`, and the Redis its operations are kept in. Opened by the
app's lifespan, closed when it ends (SIGTERM: uvicorn stops taking requests, lets those
in flight finish, then the lifespan closes these)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from redis.asyncio import Redis

from keeper_api.settings import ApiSettings
from keeper_api.tokens import Tokens
from keeper_shared.bus.client import BusClient
from keeper_shared.keeper_client.client import KeeperClient, client_origin
from keeper_shared.sealing.keys import SealingPublicKey


@dataclass
class ApiState:
    settings: ApiSettings
    tokens: Tokens
    keeper: KeeperClient
    redis: Redis
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    """Operations this replica carries out; awaited (bounded) before it exits."""


def api_state(request: Request) -> ApiState:
    state: ApiState = request.app.state.api
    return state


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: ApiSettings = app.state.settings
    tokens = Tokens.load(settings.tokens_file)
    bus = await BusClient.connect(
        settings.amqp_urls,
        source="api",
        origin=client_origin(settings.amqp_urls),
        declare_exchanges=False,
    )
    keeper = KeeperClient(
        bus,
        request_timeout_s=settings.timeout_s,
        store_target=settings.store_target,
        policy_target=settings.policy_target,
        store_sealing_key=(
            SealingPublicKey.from_text(settings.store_sealing_key)
            if settings.store_sealing_key
            else None
        ),
    )
    redis = Redis.from_url(settings.redis_url)
    app.state.api = ApiState(settings, tokens, keeper, redis)
    try:
        yield
    finally:
        running = app.state.api.tasks
        if running:
            # An operation already sent goes on server side; give its reply a bounded wait
            # so its outcome is recorded, then leave it as `running` for a poll to see.
            await asyncio.wait(running, timeout=min(settings.timeout_s, 20.0))
        await keeper.close()
        await redis.aclose()
