"""One service's connection to the bus: publish with confirms, consume with manual acks, call.

Publishing always waits for the broker's confirm, so "published" means "the broker has it".
Consuming acks only after the handler returned, so a crash mid-handler means redelivery.
A handler that raises gets the message requeued until the queue's delivery limit parks it in
the dead-letter queue; a body that cannot even be decoded goes there at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import aio_pika
import aiormq.exceptions
import structlog
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)

from keeper_shared.bus.node_failover import NodeFailover, broker_user, connect_first_answering
from keeper_shared.bus.rejection import command_subject, rejection
from keeper_shared.bus.topology import (
    COMMANDS_EXCHANGE,
    EVENTS_EXCHANGE,
    HOST_REQUESTS_EXCHANGE,
    REPLIES_EXCHANGE,
    QueueSpec,
    declare_exchanges,
    declare_queue,
    event_routing_key,
    reply_queue_name,
)
from keeper_shared.bus.upgrade_levels import (
    RELEASE_HEADER,
    ReceiverLevels,
    configured_level,
    sender_release,
)
from keeper_shared.messages.commands import CommandRejected, RejectionCode
from keeper_shared.messages.envelope import (
    Envelope,
    MessageError,
    NotExpressibleError,
    Payload,
    decode,
    encode,
    new_envelope,
    peek_type,
)
from keeper_shared.messages.releases import CURRENT_RELEASE, UpgradeLevel
from keeper_shared.observability import metrics
from keeper_shared.runtime.startup import wait_for_dependency

R = TypeVar("R", bound=Payload)
log = structlog.get_logger(__name__)


class CallError(RuntimeError):
    """A command could not be completed: no reply in time, or nowhere to deliver it."""


class CallTimeoutError(CallError, TimeoutError):
    """A command got no reply in time (the target may be down or slow)."""


class NoRouteError(CallError):
    """No queue is bound for the command's target; the broker returned it at once."""


class ReceiverCannotReadError(CallError):
    """The command was not sent: the target's release cannot read it (see
    ``keeper_shared.bus.upgrade_levels``); nothing was done."""


class CommandRejectedError(CallError):
    """The receiver could not take the command at all (see ``code``); nothing was done."""

    def __init__(self, rejected: CommandRejected) -> None:
        super().__init__(f"{rejected.code.value}: {rejected.error}")
        self.code = rejected.code
        self.reason = rejected.error


def decode_reply(body: bytes, reply_type: type[R]) -> Envelope[R]:
    """The reply as ``reply_type``; raise CommandRejectedError for a rejection."""
    if peek_type(body) == CommandRejected.message_type:
        raise CommandRejectedError(decode(body, CommandRejected).data)
    return decode(body, reply_type)


def encode_for(envelope: Envelope[Any], level: UpgradeLevel) -> bytes:
    """``envelope`` for the wire at the versions a receiver at ``level`` reads; raises
    NotExpressibleError (logged: the sender refuses it) when it cannot be told there."""
    try:
        version = None if level.is_current else level.version_for(envelope.type)
        return encode(envelope, version=version)
    except NotExpressibleError as error:
        log.error(
            "message not sent: its receiver's release cannot read it",
            type=envelope.type,
            release=level.release,
            reason=str(error),
        )
        raise


class MessageRefusedError(Exception):
    """Raised by a handler for a message that must never be acted on (a host speaking for
    another host): it is dead-lettered, kept as evidence, and not retried."""


BROKER_CLOSE_TIMEOUT_S = 5.0
"""Bound on each closing handshake with the broker: stopping never hangs on a channel or
connection the broker (or a half-open channel cancelled mid-open) does not answer for."""
EVENT_CONFIRM_TIMEOUT_S = 3.0
"""Bound on waiting for the broker's confirm of an event. A publish in flight while the
connection to a node drops can be left with neither a confirm nor an error by the
reconnect: a host agent's announcement hung for 33 s in a chaos run, every later change
of that host queued behind it and every fetch that waited on one of those changes timed
out. Timed out, it is an ordinary failed publish that its caller retries; an event the
broker did take is then published twice, which facts allow."""

DEADLINE_HEADER = "x-keeper-deadline-ms"
"""Unix time (ms, an integer: AMQP floats may travel as float32) after which a command is
void: its caller has stopped waiting.

A command carries its deadline instead of a per-message TTL so that an expired command is
dropped by its consumer rather than dead-lettered: a `vm.prepare` carries TPM state, and a
dead-letter queue is no place to keep it.
"""


LOG_CONTEXT_FIELDS = ("vm_id", "host")
"""Payload fields every log line of a handler carries, so an operator can follow one VM or
host through every service's logs."""


def _log_context(payload: Payload) -> dict[str, str]:
    fields = {name: getattr(payload, name, None) for name in LOG_CONTEXT_FIELDS}
    return {name: value for name, value in fields.items() if isinstance(value, str)}


def _requeue_backoff_s(message: AbstractIncomingMessage) -> float:
    """Wait before a requeue, longer with each delivery (quorum queues count them), so a
    dependency that is down for seconds (Redis restarting) does not use up the delivery
    limit in milliseconds and park healthy messages in the dead-letter queue."""
    count = (message.headers or {}).get("x-delivery-count", 0)
    attempts = count if isinstance(count, int) else 0
    return float(min(0.25 * 2**attempts, 4.0))


@dataclass(frozen=True)
class Delivery:
    """What a handler may need to know about how a message arrived."""

    user_id: str | None
    """The publishing user as validated by the broker (None if the publisher set none)."""
    redelivered: bool
    reply_to: str | None
    correlation_id: str | None
    caller_release: str | None = None
    """The release the sender named (``x-keeper-release``); its reply is sent at it."""


Handler = Callable[[Envelope[Any], Delivery], Awaitable[Payload | None]]


@dataclass(frozen=True)
class Route:
    """Which payload type a consumer accepts and what handles it."""

    payload_type: type[Payload]
    handler: Handler


class Consumer:
    """A running consumer; :meth:`stop` stops taking work and waits for what is in flight."""

    def __init__(self, queue: AbstractQueue, channel: AbstractChannel) -> None:
        self._queue = queue
        self._channel = channel
        self._tag: str | None = None
        self.in_flight: set[asyncio.Task[None]] = set()

    async def stop(self, grace_s: float) -> None:
        """Cancel the subscription, wait up to ``grace_s`` for handlers, cancel the rest."""
        if self._tag is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(BROKER_CLOSE_TIMEOUT_S):
                    await self._queue.cancel(self._tag)
            self._tag = None
        if self.in_flight:
            _, pending = await asyncio.wait(self.in_flight, timeout=grace_s)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        with contextlib.suppress(Exception):
            async with asyncio.timeout(BROKER_CLOSE_TIMEOUT_S):
                await self._channel.close()


class BusClient:
    """A service's handle on RabbitMQ."""

    def __init__(
        self,
        connection: AbstractRobustConnection,
        *,
        source: str,
        origin: str,
        user_id: str,
        failover: NodeFailover | None = None,
        declare_exchanges: bool = True,
        levels: ReceiverLevels | None = None,
    ) -> None:
        self._connection = connection
        self.levels = levels if levels is not None else ReceiverLevels(configured_level())
        """The release each receiver reads; policy and the store teach it the hosts'."""
        self._declares_exchanges = declare_exchanges
        self._failover = failover
        self.source = source
        self.origin = origin
        self._user_id = user_id
        self._channel: AbstractChannel | None = None
        self._events: AbstractExchange | None = None
        self._commands: AbstractExchange | None = None
        self._replies: AbstractExchange | None = None
        self._host_requests: AbstractExchange | None = None
        self._reply_queue_name = reply_queue_name(origin, uuid.uuid4().hex[:12])
        # correlation id -> (reply future, the broker-validated user the reply must come from)
        self._pending_calls: dict[str, tuple[asyncio.Future[bytes], str | None]] = {}
        self._consumers: list[Consumer] = []

    @classmethod
    async def connect(
        cls,
        urls: str | Sequence[str],
        *,
        source: str,
        origin: str,
        declare_exchanges: bool = True,
    ) -> BusClient:
        """Connect to the first broker node in ``urls`` that answers (one URL, or every node
        of a cluster) and declare the exchanges, or, without ``declare_exchanges`` (clients,
        whose users may not create or delete exchanges), only check that they exist. A lost
        connection is re-established, on another node while its own stays down, with every
        channel and consumer restored."""
        endpoints = [urls] if isinstance(urls, str) else list(urls)
        # Before connecting: a release this build cannot talk to is a configuration error.
        levels = ReceiverLevels(configured_level())
        user_id = broker_user(endpoints)
        connection, index = await connect_first_answering(endpoints, connection_name=source)
        client = cls(
            connection,
            source=source,
            origin=origin,
            user_id=user_id,
            failover=NodeFailover(connection, endpoints, index),
            declare_exchanges=declare_exchanges,
            levels=levels,
        )
        if not client.levels.configured.is_current:
            log.info(
                "sending at an older release's versions (KEEPER_UPGRADE_LEVEL)",
                upgrade_level=client.levels.configured.release,
            )
        try:
            await client._open()
        except BaseException:
            # The node went away while the client set up its own channel: left open, the
            # robust connection would reconnect and restore a client that nobody holds.
            await client.close()
            raise
        return client

    @classmethod
    async def connect_when_up(
        cls,
        urls: str | Sequence[str],
        *,
        source: str,
        origin: str,
        stop: asyncio.Event,
        declare_exchanges: bool = True,
    ) -> BusClient:
        """`connect`, waiting while the broker is down or still booting (a service's
        start-up); refused credentials fail at once. Raises StoppedWhileWaitingError when
        ``stop`` is set first."""
        return await wait_for_dependency(
            lambda: cls.connect(
                urls, source=source, origin=origin, declare_exchanges=declare_exchanges
            ),
            "RabbitMQ",
            stop,
            retry_on=(aio_pika.exceptions.AMQPConnectionError, OSError, TimeoutError),
            fatal=(
                aiormq.exceptions.AuthenticationError,
                aiormq.exceptions.ProbableAuthenticationError,
                aiormq.exceptions.IncompatibleProtocolError,
                aiormq.exceptions.ConnectionNotAllowed,
            ),
        )

    @property
    def connection(self) -> AbstractRobustConnection:
        """The underlying connection, for consumers this client does not manage."""
        return self._connection

    async def _open(self) -> None:
        # on_return_raises: a command to a target with no bound queue fails at once.
        channel = await self._connection.channel(publisher_confirms=True, on_return_raises=True)
        self._channel = channel
        if self._declares_exchanges:
            self._events, self._commands = await declare_exchanges(channel)
        else:  # passive: needs no configure permission, fails if the services never ran
            self._events = await channel.get_exchange(EVENTS_EXCHANGE, ensure=True)
            self._commands = await channel.get_exchange(COMMANDS_EXCHANGE, ensure=True)
        self._replies = await channel.get_exchange(REPLIES_EXCHANGE, ensure=False)
        self._host_requests = await channel.get_exchange(HOST_REQUESTS_EXCHANGE, ensure=False)
        reply_queue = await channel.declare_queue(
            self._reply_queue_name, exclusive=True, auto_delete=True
        )
        await reply_queue.bind(REPLIES_EXCHANGE, routing_key=self._reply_queue_name)
        await reply_queue.consume(self._on_reply, no_ack=True)

    async def close(self, grace_s: float = 10.0) -> None:
        """Stop every consumer (bounded wait for in-flight work), then close."""
        for consumer in self._consumers:
            await consumer.stop(grace_s)
        for future, _ in self._pending_calls.values():
            future.cancel()
        if self._failover is not None:
            await self._failover.stop()
        try:
            async with asyncio.timeout(BROKER_CLOSE_TIMEOUT_S):
                await self._connection.close()
        except TimeoutError:
            log.warning("broker did not confirm the close in time; leaving the connection")

    def _message(
        self,
        envelope: Envelope[Any],
        level: UpgradeLevel,
        headers: dict[str, Any] | None = None,
        **properties: Any,
    ) -> aio_pika.Message:
        """The AMQP message for ``envelope``, at the versions ``level`` reads."""
        body = encode_for(envelope, level)
        return aio_pika.Message(
            body=body,
            headers={**(headers or {}), RELEASE_HEADER: CURRENT_RELEASE},
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=str(envelope.id),
            type=envelope.type,
            timestamp=envelope.time,
            user_id=self._user_id or None,
            **properties,
        )

    async def publish_event(
        self, payload: Payload, *, subject: str, attempts: int = 1
    ) -> Envelope[Any]:
        """Publish a fact to the events exchange and wait for the broker's confirm; raises
        TimeoutError when it does not come within `EVENT_CONFIRM_TIMEOUT_S` in any of
        ``attempts`` publishes. A caller whose own retry costs much (the store's is a
        redelivered event, checked and announced again) asks for more than one: an
        overloaded broker confirms late, and the same fact published again is harmless."""
        assert self._events is not None
        envelope = new_envelope(payload, source=self.source, subject=subject)
        message = self._message(envelope, self.levels.configured)
        routing_key = event_routing_key(envelope.type, self.origin)
        for attempt in range(1, attempts + 1):
            try:
                async with asyncio.timeout(EVENT_CONFIRM_TIMEOUT_S):
                    await self._events.publish(message, routing_key=routing_key, mandatory=False)
            except TimeoutError:
                metrics.EVENT_CONFIRMS_LATE.inc()
                if attempt == attempts:
                    raise
            else:
                break
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
        """Send a command to ``target`` and wait for its reply. The command is void after
        ``timeout_s``: a target that comes back late drops it instead of acting on it.
        The broker's confirm and the reply together get ``timeout_s``: a confirm that never
        comes (a quorum queue whose leader is stale) times the call out like a lost reply.

        With ``replier``, only a reply whose broker-validated ``user_id`` is ``replier``
        counts: a host speaks only for itself (invariant 3).

        With ``host_request``, the command goes to the host-requests exchange (a host
        asking policy or the store for itself) instead of the commands exchange."""
        assert self._commands is not None
        exchange = self._host_requests if host_request else self._commands
        assert exchange is not None
        envelope = new_envelope(payload, source=self.source, subject=subject)
        try:
            message = self._message(
                envelope,
                self.levels.for_target(target),
                correlation_id=str(envelope.id),
                reply_to=self._reply_queue_name,
                headers={DEADLINE_HEADER: int((time.time() + timeout_s) * 1000)},
            )
        except NotExpressibleError as error:
            raise ReceiverCannotReadError(f"{envelope.type} to {target}: {error}") from None
        correlation_id = str(envelope.id)
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._pending_calls[correlation_id] = (future, replier)
        deadline = asyncio.get_running_loop().time() + timeout_s
        try:
            try:
                async with asyncio.timeout_at(deadline):
                    await exchange.publish(
                        message,
                        routing_key=target,
                        mandatory=True,
                    )
            except TimeoutError:
                # Whether the broker has it is unknown; its deadline voids it either way.
                raise CallTimeoutError(
                    f"{envelope.type} to {target} got no confirm within {timeout_s:.1f} s"
                ) from None
            except aio_pika.exceptions.DeliveryError as error:
                if getattr(error.frame, "name", "") == "Basic.Nack":
                    # The queue exists but did not take the command (a quorum queue without
                    # a leader): worth a retry, unlike a command nobody is bound for.
                    raise CallError(f"{envelope.type}: broker refused it for {target}") from None
                raise NoRouteError(f"{envelope.type}: no queue is bound for {target}") from None
            try:
                async with asyncio.timeout_at(deadline):
                    body = await future
            except TimeoutError:
                raise CallTimeoutError(
                    f"{envelope.type} to {target} got no reply within {timeout_s:.1f} s"
                ) from None
        finally:
            self._pending_calls.pop(correlation_id, None)
        return decode_reply(body, reply_type)

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        pending = self._pending_calls.get(message.correlation_id or "")
        if pending is None or pending[0].done():
            return
        future, replier = pending
        if replier is not None and message.user_id != replier:
            log.warning("reply from the wrong user ignored", user=message.user_id, expected=replier)
            return
        future.set_result(message.body)

    async def _answer_rejected(
        self, message: AbstractIncomingMessage, rejected: CommandRejected
    ) -> None:
        """Reply ``rejected`` to a command that names a reply address (events name none)."""
        if message.reply_to is None:
            return
        delivery = Delivery(
            user_id=message.user_id,
            redelivered=bool(message.redelivered),
            reply_to=message.reply_to,
            correlation_id=message.correlation_id,
            caller_release=sender_release(message.headers),
        )
        await self._reply(delivery, rejected, command_subject(message.body))

    async def _reply(self, delivery: Delivery, payload: Payload, subject: str) -> None:
        assert self._replies is not None
        if delivery.reply_to is None:
            return
        envelope = new_envelope(payload, source=self.source, subject=subject)
        level = ReceiverLevels.for_reply(delivery.caller_release)
        try:
            message = self._message(envelope, level, correlation_id=delivery.correlation_id)
        except NotExpressibleError:
            # Logged by encode_for. The command was carried out, so no rejection is sent in
            # its place: the caller times out as if the reply were lost.
            return
        try:
            await self._replies.publish(
                message,
                routing_key=delivery.reply_to,
                mandatory=False,
            )
        except aio_pika.exceptions.AMQPError as error:
            log.warning("reply not sent", reason=type(error).__name__)

    async def consume(self, spec: QueueSpec, routes: list[Route], *, prefetch: int) -> Consumer:
        """Declare ``spec`` and start handling its messages with the matching route."""
        channel = await self._connection.channel()
        await channel.set_qos(prefetch_count=prefetch)
        queue = await declare_queue(channel, spec)
        consumer = Consumer(queue, channel)
        by_type: Mapping[str, Route] = {route.payload_type.message_type: route for route in routes}

        async def on_message(message: AbstractIncomingMessage) -> None:
            task = asyncio.current_task()
            if task is not None:
                consumer.in_flight.add(task)
            try:
                await self._handle(message, by_type)
            finally:
                if task is not None:
                    consumer.in_flight.discard(task)

        consumer._tag = await queue.consume(on_message)
        self._consumers.append(consumer)
        return consumer

    async def _handle(self, message: AbstractIncomingMessage, by_type: Mapping[str, Route]) -> None:
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(
            message_id=message.message_id, queue_type=message.type
        )
        deadline = (message.headers or {}).get(DEADLINE_HEADER)
        now_ms = int(time.time() * 1000)
        if isinstance(deadline, int) and now_ms > deadline:
            late_ms = now_ms - deadline
            log.info("expired command dropped", late_ms=late_ms)
            metrics.EVENTS_HANDLED.labels(type="command", outcome="expired").inc()
            # Answered so the caller knows it was not carried out, then dropped: nothing is
            # wrong with it that someone would have to look at in a dead-letter queue.
            await self._answer_rejected(
                message,
                CommandRejected(
                    code=RejectionCode.EXPIRED,
                    error=f"arrived {late_ms} ms after its deadline; not carried out",
                    command_type=message.type,
                ),
            )
            await message.ack()
            return
        try:
            message_type = peek_type(message.body)
            route = by_type.get(message_type)
            if route is None and message.reply_to is None:
                # Topic bindings are coarse (`vm.*.*`); types nobody here handles are facts
                # meant for other consumers, so acknowledging them loses nothing.
                metrics.EVENTS_HANDLED.labels(type="other", outcome="ignored").inc()
                await message.ack()
                return
            if route is None:
                raise MessageError(f"no handler here for {message_type!r}")
            envelope = decode(message.body, route.payload_type)
        except MessageError as error:
            log.warning("message refused, dead-lettered", reason=str(error))
            metrics.EVENTS_HANDLED.labels(type="invalid", outcome="refused").inc()
            metrics.DEAD_LETTERED.labels(type="invalid").inc()
            # A command with a reply address learns why at once, before it is parked.
            await self._answer_rejected(message, rejection(message.body, set(by_type), error))
            await message.reject(requeue=False)
            return
        structlog.contextvars.bind_contextvars(
            subject=envelope.subject, type=envelope.type, **_log_context(envelope.data)
        )
        delivery = Delivery(
            user_id=message.user_id,
            redelivered=bool(message.redelivered),
            reply_to=message.reply_to,
            correlation_id=message.correlation_id,
            caller_release=sender_release(message.headers),
        )
        try:
            reply = await route.handler(envelope, delivery)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await message.nack(requeue=True)
            raise
        except MessageRefusedError as refusal:
            log.warning("message refused, dead-lettered", reason=str(refusal))
            metrics.EVENTS_HANDLED.labels(type=envelope.type, outcome="refused").inc()
            metrics.DEAD_LETTERED.labels(type=envelope.type).inc()
            await self._answer_rejected(
                message,
                CommandRejected(
                    code=RejectionCode.FORBIDDEN, error=str(refusal), command_type=envelope.type
                ),
            )
            await message.reject(requeue=False)
            return
        except Exception:
            log.exception("handler failed, message requeued")
            metrics.EVENTS_HANDLED.labels(type=envelope.type, outcome="failed").inc()
            await asyncio.sleep(_requeue_backoff_s(message))
            await message.nack(requeue=True)
            return
        if reply is not None:
            await self._reply(delivery, reply, envelope.subject)
        await message.ack()
        metrics.EVENTS_HANDLED.labels(type=envelope.type, outcome="ok").inc()
