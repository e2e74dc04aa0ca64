"""What one API process holds while it serves: its settings, tokens, its connection to the
bus as a :class:`KeeperClient`, and the Redis its operations are kept in. Opened by the
app's lifespan, closed when it ends (SIGTERM: uvicorn stops taking requests, lets those in
flight finish, then the lifespan closes these). The API serves before RabbitMQ answers:
requests that need the bus get 503 meanwhile, and ``/health/ready`` says whether it is
reached."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import aiormq.exceptions
import structlog
from fastapi import FastAPI, Request
from redis.asyncio import Redis

from keeper_api.settings import ApiSettings
from keeper_api.tokens import Tokens
from keeper_shared.bus.client import BusClient
from keeper_shared.keeper_client.client import KeeperClient, client_origin
from keeper_shared.redis_access.connection import connect_redis
from keeper_shared.runtime.startup import StoppedWhileWaitingError
from keeper_shared.runtime.tls_failure import TlsHandshakeError

log = structlog.get_logger(__name__)


class BusNotReadyError(ConnectionError):
    """The API has not reached RabbitMQ yet (or the broker refused it): a request that
    needs the bus is answered 503 ``unreachable`` meanwhile."""


@dataclass
class ApiState:
    settings: ApiSettings
    tokens: Tokens
    redis: Redis
    connected: KeeperClient | None = None
    """The bus client, once RabbitMQ answered (the API serves, and says so, before)."""
    bus_problem: str = "RabbitMQ not reached yet"
    """Why there is no bus client, while there is none."""
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    """Operations this replica carries out; awaited (bounded) before it exits."""

    @property
    def keeper(self) -> KeeperClient:
        """The bus client; raises BusNotReadyError before RabbitMQ answered."""
        if self.connected is None:
            raise BusNotReadyError(self.bus_problem)
        return self.connected


def api_state(request: Request) -> ApiState:
    state: ApiState = request.app.state.api
    return state


async def _connect(state: ApiState, stop: asyncio.Event) -> None:
    """Reach RabbitMQ, waiting while it is down or booting (as the services start), and
    hand the API its bus client; refused credentials or certificates are logged and leave
    the API answering 503 with the reason, as a readiness probe should see it."""
    settings = state.settings
    try:
        bus = await BusClient.connect_when_up(
            settings.amqp_urls,
            source="api",
            origin=client_origin(settings.amqp_urls),
            stop=stop,
            declare_exchanges=False,
        )
    except StoppedWhileWaitingError:
        return
    except (ConnectionError, aiormq.exceptions.AMQPError, TlsHandshakeError) as error:
        state.bus_problem = f"RabbitMQ refused the API: {error}"
        log.error("bus refused", reason=str(error))
        return
    state.connected = KeeperClient.configured(bus, settings)
    log.info("bus reached")


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: ApiSettings = app.state.settings
    tokens = Tokens.load(settings.tokens_file)
    redis = connect_redis(settings)
    state = ApiState(settings, tokens, redis)
    app.state.api = state
    stop = asyncio.Event()
    connecting = asyncio.create_task(_connect(state, stop))
    try:
        yield
    finally:
        stop.set()
        await connecting
        running = set(state.tasks)
        if running:
            # An operation already sent goes on server side; give its reply a bounded wait
            # so its outcome is recorded, then record those still waiting as interrupted.
            _done, waiting = await asyncio.wait(running, timeout=min(settings.timeout_s, 20.0))
            for task in waiting:
                task.cancel()
            await asyncio.gather(*waiting, return_exceptions=True)
        if state.connected is not None:
            await state.connected.close()
        await redis.aclose()
