"""An in-memory bus double: a service's handlers under test without a RabbitMQ node.

Like faststream's ``TestRabbitBroker``, it keeps the real message path and replaces only the
transport. Every message is encoded to the bytes the broker would carry and handled by the
production :meth:`BusClient._handle` (decode, deadline, routing by type, replies, ack /
requeue / dead-letter), so a handler test exercises the same ack discipline as the real bus.
Routing follows :mod:`keeper_shared.bus.topology`: events by topic pattern, commands by the
queue's command key, replies to the caller, each consumer's delivery limit, its DLQ.

What it does not model: publisher confirms, broker permissions (the ``user_id`` is whatever
the test gave the client: topic permissions and user validation are the real broker's
job, tested in tests/integration), connection loss, prefetch.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Coroutine, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, cast

from aio_pika.abc import AbstractIncomingMessage

from keeper_shared.bus.client import (
    DEADLINE_HEADER,
    BusClient,
    CallTimeoutError,
    Consumer,
    Delivery,
    NoRouteError,
    R,
    ReceiverCannotReadError,
    Route,
    decode_reply,
    encode_for,
)
from keeper_shared.bus.topology import QueueSpec, event_routing_key, reply_queue_name
from keeper_shared.bus.upgrade_levels import RELEASE_HEADER, ReceiverLevels
from keeper_shared.messages.envelope import Envelope, NotExpressibleError, Payload, new_envelope
from keeper_shared.messages.releases import CURRENT_RELEASE, UpgradeLevel


def topic_matches(pattern: str, routing_key: str) -> bool:
    """AMQP topic matching: ``*`` is exactly one word, ``#`` zero or more."""
    return _words_match(pattern.split("."), routing_key.split("."))


def _words_match(pattern: list[str], words: list[str]) -> bool:
    if not pattern:
        return not words
    head, rest = pattern[0], pattern[1:]
    if head == "#":
        return any(_words_match(rest, words[skip:]) for skip in range(len(words) + 1))
    if not words:
        return False
    return head in ("*", words[0]) and _words_match(rest, words[1:])


@dataclass
class MemoryMessage:
    """What a consumer receives: the attributes and settle calls `BusClient._handle` uses."""

    body: bytes
    queue: MemoryQueue | None = None
    """The queue it was delivered from (None while it is being published)."""
    message_id: str | None = None
    type: str | None = None
    user_id: str | None = None
    reply_to: str | None = None
    correlation_id: str | None = None
    headers: dict[str, Any] = field(default_factory=dict)
    redelivered: bool = False
    settled: str | None = None
    """``ack``, ``requeue`` or ``reject`` once the consumer settled it."""

    async def ack(self) -> None:
        self.settled = "ack"

    async def nack(self, requeue: bool = True) -> None:
        self.settled = "requeue" if requeue else "reject"
        assert self.queue is not None, "only a delivered message is settled"
        if requeue:
            self.queue.redeliver(self)
        else:
            self.queue.dead_letter(self)

    async def reject(self, requeue: bool = False) -> None:
        await self.nack(requeue=requeue)


class MemoryQueue:
    """One quorum queue: its consumer, its delivery limit and its dead-letter queue."""

    def __init__(self, broker: MemoryBroker, spec: QueueSpec) -> None:
        self.broker = broker
        self.spec = spec
        self.dead_letters: list[MemoryMessage] = []
        self.handled: list[MemoryMessage] = []
        self._consumer: tuple[BusClient, Mapping[str, Route]] | None = None

    def attach(self, client: BusClient, routes: Sequence[Route]) -> None:
        self._consumer = (client, {route.payload_type.message_type: route for route in routes})

    def detach(self) -> None:
        self._consumer = None

    def deliver(self, message: MemoryMessage) -> None:
        """Hand ``message`` to the consumer in a task of its own, as aio-pika does."""
        if self._consumer is None:
            self.broker.unconsumed.append(message)
            return
        client, by_type = self._consumer
        self.handled.append(message)
        handle = client._handle(cast(AbstractIncomingMessage, message), by_type)
        self.broker.spawn(handle)

    def redeliver(self, message: MemoryMessage) -> None:
        """A requeue: delivered again until the queue's delivery limit, then dead-lettered
        (RabbitMQ's quorum queues count deliveries in ``x-delivery-count``)."""
        count = int(message.headers.get("x-delivery-count", 0)) + 1
        if count > self.spec.delivery_limit:
            self.dead_letter(message)
            return
        headers = {**message.headers, "x-delivery-count": count}
        self.deliver(replace(message, headers=headers, redelivered=True, settled=None))

    def dead_letter(self, message: MemoryMessage) -> None:
        self.dead_letters.append(message)


class MemoryBroker:
    """The exchanges and queues of one test: create a client per service with
    :meth:`client`, then :meth:`settled` waits until every message has been handled."""

    def __init__(self) -> None:
        self.queues: dict[str, MemoryQueue] = {}
        self.events: list[tuple[str, bytes]] = []
        """Every published event: (routing key, body), in order."""
        self.unconsumed: list[MemoryMessage] = []
        self._reply_waiters: dict[str, asyncio.Future[MemoryMessage]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def client(self, *, source: str, origin: str, user_id: str | None = None) -> MemoryBus:
        """A bus client for one service; ``user_id`` is what the broker would validate (the
        service's AMQP user), defaulting to ``origin``."""
        return MemoryBus(self, source=source, origin=origin, user_id=user_id or origin)

    def spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def queue(self, spec: QueueSpec) -> MemoryQueue:
        """The queue of ``spec``, declared on first use (declarations are idempotent)."""
        if spec.name not in self.queues:
            self.queues[spec.name] = MemoryQueue(self, spec)
        return self.queues[spec.name]

    def publish_event(self, routing_key: str, message: MemoryMessage) -> None:
        self.events.append((routing_key, message.body))
        for queue in self.queues.values():
            if any(topic_matches(p, routing_key) for p in queue.spec.event_bindings):
                queue.deliver(replace(message, queue=queue))

    def publish_command(
        self, target: str, message: MemoryMessage, *, host_request: bool = False
    ) -> bool:
        """Route a command by its target (on the host-requests exchange with
        ``host_request``); False when no queue is bound for it."""
        bound = [
            q
            for q in self.queues.values()
            if (q.spec.host_request_key if host_request else q.spec.command_key) == target
        ]
        for queue in bound:
            queue.deliver(replace(message, queue=queue))
        return bool(bound)

    def expect_reply(self, correlation_id: str) -> asyncio.Future[MemoryMessage]:
        future: asyncio.Future[MemoryMessage] = asyncio.get_running_loop().create_future()
        self._reply_waiters[correlation_id] = future
        return future

    def reply(self, message: MemoryMessage) -> None:
        waiter = self._reply_waiters.pop(message.correlation_id or "", None)
        if waiter is not None and not waiter.done():
            waiter.set_result(message)

    async def settled(self, timeout_s: float = 30.0) -> None:
        """Wait until no delivery is being handled (handlers may publish more: those are
        waited for too). The timeout only catches a hang."""
        async with asyncio.timeout(timeout_s):
            while self._tasks:
                await asyncio.gather(*list(self._tasks), return_exceptions=True)

    def dead_lettered(self, spec: QueueSpec) -> list[MemoryMessage]:
        """What ``spec``'s queue gave up on."""
        return self.queue(spec).dead_letters


class _MemoryConsumer(Consumer):
    def __init__(self, queue: MemoryQueue) -> None:
        super().__init__(cast(Any, None), cast(Any, None))
        self._memory_queue = queue

    async def stop(self, grace_s: float) -> None:
        self._memory_queue.detach()


class MemoryBus(BusClient):
    """A :class:`BusClient` whose transport is a :class:`MemoryBroker`."""

    def __init__(self, broker: MemoryBroker, *, source: str, origin: str, user_id: str) -> None:
        super().__init__(cast(Any, None), source=source, origin=origin, user_id=user_id)
        self.broker = broker
        self._reply_queue = reply_queue_name(origin, uuid.uuid4().hex[:12])

    def _memory_message(self, envelope: Envelope[Any], level: UpgradeLevel) -> MemoryMessage:
        """The message as `BusClient._message` builds it: capped at ``level``, naming this
        build's release."""
        return MemoryMessage(
            body=encode_for(envelope, level),
            message_id=str(envelope.id),
            type=envelope.type,
            user_id=self._user_id or None,
            headers={RELEASE_HEADER: CURRENT_RELEASE},
        )

    async def publish_event(
        self, payload: Payload, *, subject: str, attempts: int = 1
    ) -> Envelope[Any]:
        # In memory every publish is confirmed at once: ``attempts`` is never needed.
        envelope = new_envelope(payload, source=self.source, subject=subject)
        message = self._memory_message(envelope, self.levels.configured)
        self.broker.publish_event(event_routing_key(envelope.type, self.origin), message)
        return envelope

    async def call(
        self,
        target: str,
        payload: Payload,
        reply_type: type[R],
        *,
        subject: str,
        timeout_s: float,
        replier: str | None = None,
        host_request: bool = False,
    ) -> Envelope[R]:
        envelope = new_envelope(payload, source=self.source, subject=subject)
        try:
            message = self._memory_message(envelope, self.levels.for_target(target))
        except NotExpressibleError as error:
            raise ReceiverCannotReadError(f"{envelope.type} to {target}: {error}") from None
        message.reply_to = self._reply_queue
        message.correlation_id = str(envelope.id)
        message.headers[DEADLINE_HEADER] = int((time.time() + timeout_s) * 1000)
        waiter = self.broker.expect_reply(message.correlation_id)
        if not self.broker.publish_command(target, message, host_request=host_request):
            raise NoRouteError(f"{envelope.type}: no queue is bound for {target}")
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                reply = await asyncio.wait_for(
                    asyncio.shield(waiter), max(0.0, deadline - time.monotonic())
                )
            except TimeoutError:
                raise CallTimeoutError(
                    f"{envelope.type} to {target} got no reply within {timeout_s:.1f} s"
                ) from None
            if replier is None or reply.user_id == replier:
                return decode_reply(reply.body, reply_type)
            # A reply from the wrong user is ignored, as BusClient._on_reply does.
            waiter = self.broker.expect_reply(message.correlation_id)

    async def _reply(self, delivery: Delivery, payload: Payload, subject: str) -> None:
        if delivery.reply_to is None:
            return
        envelope = new_envelope(payload, source=self.source, subject=subject)
        try:
            message = self._memory_message(
                envelope, ReceiverLevels.for_reply(delivery.caller_release)
            )
        except NotExpressibleError:
            return  # as BusClient._reply: logged, and the caller times out
        message.correlation_id = delivery.correlation_id
        self.broker.reply(message)

    async def consume(self, spec: QueueSpec, routes: list[Route], *, prefetch: int) -> Consumer:
        queue = self.broker.queue(spec)
        queue.attach(self, routes)
        consumer = _MemoryConsumer(queue)
        self._consumers.append(consumer)
        return consumer

    async def close(self, grace_s: float = 10.0) -> None:
        for consumer in self._consumers:
            await consumer.stop(grace_s)
