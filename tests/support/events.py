"""Recording the events the services publish on the real bus, in the order they arrive."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, cast

import aio_pika
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection

from keeper_shared.bus.topology import EVENTS_EXCHANGE, declare_exchanges
from keeper_shared.messages.envelope import Envelope, MessageError, Payload, decode, peek_type
from support.waiting import WAIT_TIMEOUT_S, WaitTimeoutError

E = TypeVar("E", bound=Payload)

CONNECT_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Seen(Generic[E]):
    """An event as the recorder got it."""

    envelope: Envelope[E]
    received_at: float
    """When it reached the recorder (wall clock, comparable with the services' times)."""
    position: int
    """Its place in the order the broker delivered the recorder's events (0 first)."""

    @property
    def data(self) -> E:
        """The event's payload."""
        return self.envelope.data


@dataclass(frozen=True)
class _Arrival:
    message_type: str
    body: bytes
    received_at: float


def _any(_event: Payload) -> bool:
    return True


class EventRecorder:
    """Every event whose routing key matches one of the recorder's patterns, in the order
    the broker delivered them to its one queue (so "persisted before undefined" can be
    checked), decoded when a test asks for a type.

    Like ``KeeperClient.watch_events`` (an exclusive queue bound to the events exchange),
    but keeping every event and when it arrived. The connection is robust: after a broker
    restart the queue is declared and bound again and recording goes on (what was published
    while it was down is not seen).
    """

    def __init__(self, connection: AbstractRobustConnection) -> None:
        self._connection = connection
        self._arrivals: list[_Arrival] = []
        # Per payload type: how many arrivals were looked at, and what of it they held.
        # Decoding each arrival once keeps repeated looks cheap in long chaos runs.
        self._decoded: dict[type[Payload], tuple[int, list[Seen[Any]]]] = {}
        self._arrived = asyncio.Condition()

    @classmethod
    async def start(
        cls, amqp_url: str, *patterns: str, name: str = "test event recorder"
    ) -> EventRecorder:
        """Connect as ``name`` and record every event whose routing key matches one of
        ``patterns`` (topic patterns such as ``state.persisted.*``; every event without)."""
        connection = await aio_pika.connect_robust(
            amqp_url, client_properties={"connection_name": name}, timeout=CONNECT_TIMEOUT_S
        )
        recorder = cls(connection)
        try:
            channel = await connection.channel()
            await declare_exchanges(channel)  # the recorder may be up before any service
            queue = await channel.declare_queue(
                f"keeper.test.events.{uuid.uuid4().hex[:12]}", exclusive=True, auto_delete=True
            )
            for pattern in patterns or ("#",):
                await queue.bind(EVENTS_EXCHANGE, routing_key=pattern)
            await queue.consume(recorder._on_message, no_ack=True)
        except BaseException:
            await connection.close()
            raise
        return recorder

    @property
    def connection(self) -> AbstractRobustConnection:
        """The recorder's broker connection, for other looks at the broker."""
        return self._connection

    async def close(self) -> None:
        """Stop recording (what was recorded stays readable)."""
        await self._connection.close()

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        received_at = time.time()
        try:
            message_type = peek_type(message.body)
        except MessageError:
            return  # not an envelope: not the recorder's to judge
        async with self._arrived:
            self._arrivals.append(_Arrival(message_type, message.body, received_at))
            self._arrived.notify_all()

    def matching(self, event_type: type[E], matches: Callable[[E], bool] = _any) -> list[Seen[E]]:
        """Every event of ``event_type`` recorded so far that ``matches``, oldest first (a
        new list: later events do not change it). Bodies that do not decode are skipped."""
        scanned, found = self._decoded.get(event_type, (0, []))
        arrived = len(self._arrivals)
        for position in range(scanned, arrived):
            arrival = self._arrivals[position]
            if arrival.message_type == event_type.message_type:
                with contextlib.suppress(MessageError):
                    envelope = decode(arrival.body, event_type)
                    found.append(Seen(envelope, arrival.received_at, position))
        self._decoded[event_type] = (arrived, found)
        return [seen for seen in cast(list[Seen[E]], found) if matches(seen.data)]

    async def wait_for(
        self,
        event_type: type[E],
        matches: Callable[[E], bool] = _any,
        timeout_s: float = WAIT_TIMEOUT_S,
    ) -> Seen[E]:
        """The first event of ``event_type`` (recorded before or after the call) that
        matches; WaitTimeoutError when none came within ``timeout_s``."""
        return (await self.wait_for_count(event_type, 1, matches, timeout_s))[0]

    async def wait_for_count(
        self,
        event_type: type[E],
        count: int,
        matches: Callable[[E], bool] = _any,
        timeout_s: float = WAIT_TIMEOUT_S,
    ) -> list[Seen[E]]:
        """Every event of ``event_type`` that matches, once there are at least ``count``;
        WaitTimeoutError when there were fewer after ``timeout_s``."""
        try:
            async with asyncio.timeout(timeout_s), self._arrived:
                while len(found := self.matching(event_type, matches)) < count:
                    await self._arrived.wait()
                return found
        except TimeoutError:
            seen = collections.Counter(arrival.message_type for arrival in self._arrivals)
            raise WaitTimeoutError(
                f"fewer than {count} matching {event_type.message_type} within "
                f"{timeout_s:.0f} s; recorded: {dict(seen)}"
            ) from None
