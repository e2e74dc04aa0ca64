"""Run a service until SIGTERM/SIGINT, then let it stop cleanly and exit 0.

A service on the bus starts the same way everywhere: connect to a broker node, set up its
consumers and background work, watch its dead-letter queues, say it is ready, serve until
told to stop, then tear down in order. :func:`serve_on_bus` does that once for all of them.
The robust connection restores channels and consumers lost *after* start-up; a connection
lost *during* it (a node killed between "broker node reached" and the last ``queue.bind``)
raises out of whichever declaration was in flight, so the whole set-up is torn down and done
again on a fresh connection, with backoff, instead of the service exiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiormq.exceptions
import structlog
from pydantic import ValidationError
from redis.asyncio import Redis

from keeper_shared.bus.client import BusClient
from keeper_shared.bus.upgrade_levels import configured_level
from keeper_shared.messages.releases import UnknownReleaseError
from keeper_shared.observability import observe_service
from keeper_shared.runtime.garbage_collection import collect_whole_heap_less_often
from keeper_shared.runtime.startup import StoppedWhileWaitingError, wait_for_dependency

log = structlog.get_logger(__name__)

CONNECTION_LOST: tuple[type[BaseException], ...] = (
    # aiormq's AMQPConnectionError is a ConnectionError; so are the resets and broken pipes
    # a declaration in flight may see first.
    ConnectionError,
    # A channel whose connection went away under it ("writer is None", "no active transport").
    aiormq.exceptions.ChannelInvalidStateError,
)
"""Errors from a set-up step that mean "the connection went away", cured by starting over."""

REFUSED: tuple[type[BaseException], ...] = (
    aiormq.exceptions.AuthenticationError,
    aiormq.exceptions.ProbableAuthenticationError,
    aiormq.exceptions.IncompatibleProtocolError,
    aiormq.exceptions.ConnectionNotAllowed,
)
"""Connection errors (ConnectionErrors too) that no retry cures: credentials or vhost access
refused. A channel-level refusal (ChannelAccessRefused: no permission on a queue) is not a
ConnectionError and fails the start-up as well."""


def run_until_signalled(serve: Callable[[asyncio.Event], Awaitable[None]]) -> None:
    """Run ``serve(stop)``; SIGTERM or SIGINT sets ``stop`` and ``serve`` winds down.

    ``serve`` owns the bounded wait for in-flight work; the signal only asks. A
    ``KEEPER_UPGRADE_LEVEL`` this build cannot talk to stops the start before any wait.
    The garbage collector is set for a long-running service first (see
    :mod:`keeper_shared.runtime.garbage_collection`).
    """
    try:
        configured_level()
    except (UnknownReleaseError, ValidationError) as error:
        raise SystemExit(f"KEEPER_UPGRADE_LEVEL: {error}") from None
    collect_whole_heap_less_often()

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await serve(stop)

    asyncio.run(main())


@dataclass
class Serving:
    """What a service's set-up hands back: what to watch and what its "ready" line says."""

    dead_letter_queues: list[str]
    """The service's dead-letter queues, whose depth is watched while it serves."""
    ready_fields: dict[str, object] = field(default_factory=dict)
    """Facts logged with "<name> ready"."""


class ServiceStartup:
    """One attempt at setting a service up on one bus connection, and how to undo it.

    Set-up steps register their undoing as they go, so that an attempt that fails half way
    undoes exactly what it did: ``before_bus_closes`` runs first (last registered first),
    then the bus is closed (consumers stopped with the grace period, bounded handshakes),
    then ``after_bus_closes`` (last registered first).
    """

    def __init__(self, bus: BusClient, grace_s: float) -> None:
        self.bus = bus
        self.before_bus_closes = contextlib.AsyncExitStack()
        self.after_bus_closes = contextlib.AsyncExitStack()
        self._grace_s = grace_s

    async def tear_down(self) -> None:
        """Undo the attempt, in order; each step runs even if an earlier one failed."""
        try:
            await self.before_bus_closes.aclose()
        finally:
            try:
                await self.bus.close(self._grace_s)
            finally:
                await self.after_bus_closes.aclose()


SetUp = Callable[[ServiceStartup], Awaitable[Serving]]
"""A service's own start-up steps on a connected bus (consumers, background work)."""


async def serve_on_bus(
    stop: asyncio.Event,
    set_up: SetUp,
    *,
    name: str,
    amqp_endpoints: Sequence[str],
    source: str,
    origin: str,
    grace_s: float,
    redis: Redis | None = None,
) -> None:
    """Connect, run ``set_up``, watch the service (readiness also checks ``redis`` when
    given), log "<name> ready" and serve until ``stop`` is set; then "stopping" and the
    teardown. A connection lost during start-up starts it over; ``stop`` ends the wait or
    the set-up at once, and returns without "ready"."""
    try:
        startup, serving = await wait_for_dependency(
            lambda: _unless_stopped(
                _start(set_up, stop, amqp_endpoints, source, origin, grace_s, redis), stop
            ),
            "RabbitMQ",
            stop,
            retry_on=CONNECTION_LOST,
            fatal=REFUSED,
        )
    except StoppedWhileWaitingError:
        return
    try:
        log.info(f"{name} ready", **serving.ready_fields)
        await stop.wait()
        log.info("stopping")
    finally:
        await startup.tear_down()


async def _start(
    set_up: SetUp,
    stop: asyncio.Event,
    amqp_endpoints: Sequence[str],
    source: str,
    origin: str,
    grace_s: float,
    redis: Redis | None,
) -> tuple[ServiceStartup, Serving]:
    bus = await BusClient.connect_when_up(amqp_endpoints, source=source, origin=origin, stop=stop)
    startup = ServiceStartup(bus, grace_s)
    try:
        serving = await set_up(startup)
        # Entered last, so left first: the watcher ends before anything it watches closes.
        await startup.before_bus_closes.enter_async_context(
            observe_service(bus, serving.dead_letter_queues, redis)
        )
    except BaseException as error:
        if isinstance(error, CONNECTION_LOST) and not isinstance(error, REFUSED):
            log.warning("broker connection lost while starting", reason=type(error).__name__)
        await startup.tear_down()
        raise
    return startup, serving


async def _unless_stopped(
    starting: Coroutine[Any, Any, tuple[ServiceStartup, Serving]], stop: asyncio.Event
) -> tuple[ServiceStartup, Serving]:
    """Run one start-up attempt, cancelled and undone as soon as ``stop`` is set: a set-up
    step waiting for a node that went away would otherwise hold SIGTERM until it is back."""
    attempt = asyncio.create_task(starting)
    stopped = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({attempt, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if attempt.done():
            return attempt.result()
    finally:
        stopped.cancel()
        if not attempt.done():
            attempt.cancel()
            (outcome,) = await asyncio.gather(attempt, return_exceptions=True)
            # A cancelled attempt undoes itself, unless aio-pika swallowed the cancellation
            # inside a step and the set-up went on to finish: that one is undone here.
            if isinstance(outcome, tuple):
                await outcome[0].tear_down()
    raise StoppedWhileWaitingError("stopped while starting")
