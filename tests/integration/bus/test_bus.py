"""The bus helpers (`keeper_shared.bus`) against a real RabbitMQ node.

What the services rely on: a published event reaches every queue bound to its topic; a
call gets its handler's reply, or fails in bounded time and leaves no command behind for a
target that comes back late; a handler that keeps failing parks its message in the queue's
dead-letter queue after the delivery limit, and a body that cannot be decoded goes there at
once; duplicates reach the handler (idempotency is the handler's job, invariant 8); stopping
a consumer waits, within its grace, for the work in flight (invariant 1: ack after the work).

Every test uses its own queue names, routing keys and origin (uuid4), because the node is
shared by the whole session, and deletes its queues afterwards.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aio_pika
import pytest
import pytest_asyncio
import yarl
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue
from pydantic import Field

from keeper_shared.bus.client import (
    DEADLINE_HEADER,
    BusClient,
    CallTimeoutError,
    CommandRejectedError,
    Consumer,
    Delivery,
    NoRouteError,
    Route,
)
from keeper_shared.bus.topology import (
    COMMANDS_EXCHANGE,
    EVENTS_EXCHANGE,
    REPLIES_EXCHANGE,
    QueueSpec,
    declare_queue,
    reply_queue_name,
)
from keeper_shared.messages.commands import CommandRejected, RejectionCode
from keeper_shared.messages.envelope import Envelope, Payload, decode, encode, new_envelope
from support.bus_clients import ConnectBus

pytestmark = pytest.mark.rabbit

WAIT_S = 15.0
"""Upper bound for anything the broker should do promptly (generous for a loaded CI box)."""


class Ping(Payload):
    """A test command/event; never sent by the product."""

    message_type = "test.ping"

    text: str = Field(description="Anything; the echo handler upper-cases it.")


class Pong(Payload):
    """The reply to :class:`Ping`."""

    message_type = "test.pong"

    text: str = Field(description="The ping's text, upper-cased.")


Received = tuple[Envelope[Any], Delivery]
BusFactory = Callable[[], Awaitable[BusClient]]


def _unique(label: str) -> str:
    return f"test-bus-{label}-{uuid.uuid4().hex}"


@pytest_asyncio.fixture
async def queue_specs(rabbitmq_url: str) -> AsyncIterator[list[QueueSpec]]:
    """Queues the test declares; they and their DLQs are deleted at the end."""
    specs: list[QueueSpec] = []
    try:
        yield specs
    finally:
        connection = await aio_pika.connect(rabbitmq_url)
        async with connection:
            cleanup = await connection.channel()
            for spec in specs:
                for name in (spec.name, spec.dead_letter_queue):
                    # Quorum queues: if_unused=True makes the broker close the connection.
                    await cleanup.queue_delete(name, if_unused=False, if_empty=False)


@pytest.fixture
def make_bus(queue_specs: list[QueueSpec], connect_bus: ConnectBus) -> BusFactory:
    """Connect as many bus clients as the test needs. ``connect_bus`` closes them all at the
    end, and (set up after ``queue_specs``) before the queues are deleted, so no consumer
    sees its queue vanish."""

    async def connect() -> BusClient:
        return await connect_bus(source="test/bus", origin=_unique("origin"))

    return connect


@pytest_asyncio.fixture
async def channel(rabbitmq_url: str) -> AsyncIterator[AbstractChannel]:
    """A plain aio-pika channel for looking at queues behind the client's back."""
    connection = await aio_pika.connect(
        rabbitmq_url, client_properties={"connection_name": "test_bus inspector"}
    )
    async with connection:
        yield await connection.channel()


def _spec(specs: list[QueueSpec], **kwargs: Any) -> QueueSpec:
    spec = QueueSpec(name=_unique("queue"), **kwargs)
    specs.append(spec)
    return spec


def _recorder(sink: asyncio.Queue[Received]) -> Route:
    async def record(envelope: Envelope[Any], delivery: Delivery) -> None:
        await sink.put((envelope, delivery))

    return Route(Ping, record)


async def _ping_consumer(
    make_bus: BusFactory, queue_specs: list[QueueSpec]
) -> tuple[str, QueueSpec, asyncio.Queue[Received]]:
    """A consumer of pings on a command queue of its own: its routing key, its queue, and
    what it received."""
    bus = await make_bus()
    command_key = _unique("target")
    spec = _spec(queue_specs, command_key=command_key)
    received: asyncio.Queue[Received] = asyncio.Queue()
    await bus.consume(spec, [_recorder(received)], prefetch=4)
    return command_key, spec, received


async def _next(sink: asyncio.Queue[Received]) -> Received:
    async with asyncio.timeout(WAIT_S):
        return await sink.get()


async def _get_one(queue: AbstractQueue) -> AbstractIncomingMessage:
    """Poll ``queue`` with basic.get until a message arrives (acked on the way out)."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        message = await queue.get(no_ack=True, fail=False)
        if message is not None:
            return message
        await asyncio.sleep(0.1)
    pytest.fail(f"nothing arrived in {queue.name} within {WAIT_S} s")


async def _dead_letter_queue(channel: AbstractChannel, spec: QueueSpec) -> AbstractQueue:
    return await channel.declare_queue(spec.dead_letter_queue, passive=True)


def _death_reason(message: AbstractIncomingMessage) -> object:
    return message.headers.get("x-first-death-reason")


async def test_event_reaches_queue_bound_by_topic(
    make_bus: BusFactory,
    channel: AbstractChannel,
    queue_specs: list[QueueSpec],
    rabbitmq_url: str,
) -> None:
    publisher = await make_bus()
    consumer_bus = await make_bus()
    bound = _spec(queue_specs, event_bindings=(f"test.ping.{publisher.origin}",))
    elsewhere = _spec(queue_specs, event_bindings=(f"test.ping.{_unique('other-origin')}",))
    await declare_queue(channel, elsewhere)
    received: asyncio.Queue[Received] = asyncio.Queue()
    await consumer_bus.consume(bound, [_recorder(received)], prefetch=4)

    vm_id = str(uuid.uuid4())
    sent = await publisher.publish_event(Ping(text="hello"), subject=vm_id)

    envelope, delivery = await _next(received)
    assert envelope.id == sent.id
    assert envelope.subject == vm_id
    assert envelope.data == Ping(text="hello")
    # The broker validated the publishing user (the store's host check relies on it).
    assert delivery.user_id == yarl.URL(rabbitmq_url).user
    assert delivery.redelivered is False
    # A queue bound to another origin's key saw nothing.
    other = await channel.declare_queue(elsewhere.name, passive=True)
    assert await other.get(no_ack=True, fail=False) is None


async def test_call_gets_the_handlers_reply(
    make_bus: BusFactory, queue_specs: list[QueueSpec]
) -> None:
    caller = await make_bus()
    responder = await make_bus()
    target = _unique("target")
    seen: list[Delivery] = []

    async def echo(envelope: Envelope[Any], delivery: Delivery) -> Pong:
        seen.append(delivery)
        return Pong(text=envelope.data.text.upper())

    await responder.consume(_spec(queue_specs, command_key=target), [Route(Ping, echo)], prefetch=4)
    vm_id = str(uuid.uuid4())

    reply = await caller.call(target, Ping(text="are you there"), Pong, subject=vm_id, timeout_s=10)

    assert reply.type == "test.pong"
    assert reply.data == Pong(text="ARE YOU THERE")
    assert reply.subject == vm_id
    assert reply.source == responder.source
    assert len(seen) == 1
    assert seen[0].reply_to is not None
    assert seen[0].correlation_id is not None


async def test_call_to_a_target_without_a_queue_fails_at_once(make_bus: BusFactory) -> None:
    caller = await make_bus()
    started = time.monotonic()
    with pytest.raises(NoRouteError, match="no queue is bound"):
        await caller.call(
            _unique("nobody"), Ping(text="x"), Pong, subject=str(uuid.uuid4()), timeout_s=30.0
        )
    # The broker returns the unroutable command, so the caller need not wait out its timeout.
    assert time.monotonic() - started < 10.0


async def test_unanswered_command_is_dropped_by_a_late_target_not_dead_lettered(
    make_bus: BusFactory, channel: AbstractChannel, queue_specs: list[QueueSpec]
) -> None:
    caller = await make_bus()
    target = _unique("sleeping-host")
    spec = _spec(queue_specs, command_key=target)
    await declare_queue(channel, spec)  # bound, but nobody consumes yet

    started = time.monotonic()
    with pytest.raises(CallTimeoutError):
        await caller.call(target, Ping(text="x"), Pong, subject=str(uuid.uuid4()), timeout_s=1.0)
    assert 1.0 <= time.monotonic() - started < 3.0

    # The target comes back: the void command is acknowledged and dropped unhandled, and
    # nothing is parked in the DLQ (a timed-out vm.prepare carries TPM state).
    handled: asyncio.Queue[Received] = asyncio.Queue()
    late = await make_bus()
    await late.consume(spec, [_recorder(handled)], prefetch=1)
    await asyncio.sleep(1.0)
    assert handled.empty()
    assert await (await _dead_letter_queue(channel, spec)).get(no_ack=True, fail=False) is None
    declared = await channel.declare_queue(spec.name, passive=True)
    assert declared.declaration_result.message_count == 0


async def test_failing_handler_is_retried_up_to_the_delivery_limit_then_dead_lettered(
    make_bus: BusFactory, channel: AbstractChannel, queue_specs: list[QueueSpec]
) -> None:
    bus = await make_bus()
    spec = _spec(queue_specs, event_bindings=(f"test.ping.{bus.origin}",), delivery_limit=2)
    attempts: list[Received] = []

    async def always_fails(envelope: Envelope[Any], delivery: Delivery) -> None:
        attempts.append((envelope, delivery))
        raise RuntimeError("simulated handler failure")

    await bus.consume(spec, [Route(Ping, always_fails)], prefetch=1)
    sent = await bus.publish_event(Ping(text="poison"), subject=str(uuid.uuid4()))

    parked = await _get_one(await _dead_letter_queue(channel, spec))
    # With x-delivery-limit=2 RabbitMQ 3.10 delivers 3 times, then dead-letters.
    assert _death_reason(parked) == "delivery_limit"
    assert parked.message_id == str(sent.id)
    await asyncio.sleep(0.5)  # no fourth attempt after it was parked
    assert [envelope.id for envelope, _ in attempts] == [sent.id] * 3
    assert [delivery.redelivered for _, delivery in attempts] == [False, True, True]
    queue = await channel.declare_queue(spec.name, passive=True)
    assert await queue.get(no_ack=True, fail=False) is None


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"\xff\xfe\x00 definitely not json", id="garbage-bytes"),
        pytest.param(b'{"type": "test.ping", "schema_version": 1, "data": {}}', id="bad-payload"),
        pytest.param(
            b'{"id": "1", "type": "test.ping", "schema_version": 99, "data": {"text": "x"}}',
            id="unknown-schema-version",
        ),
    ],
)
async def test_undecodable_body_is_dead_lettered_at_once_without_the_handler(
    body: bytes,
    make_bus: BusFactory,
    channel: AbstractChannel,
    queue_specs: list[QueueSpec],
) -> None:
    command_key, spec, received = await _ping_consumer(make_bus, queue_specs)

    commands = await channel.get_exchange(COMMANDS_EXCHANGE)
    await commands.publish(
        aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
        routing_key=command_key,
    )

    parked = await _get_one(await _dead_letter_queue(channel, spec))
    assert parked.body == body
    # Rejected on the first delivery, not retried up to the limit.
    assert _death_reason(parked) == "rejected"
    assert received.empty()


async def test_message_of_a_type_nobody_here_handles_is_acked_not_dead_lettered(
    make_bus: BusFactory, channel: AbstractChannel, queue_specs: list[QueueSpec]
) -> None:
    """Documents the coarse-binding rule: other consumers' facts are dropped, not parked."""
    bus = await make_bus()
    spec = _spec(queue_specs, event_bindings=(f"test.*.{bus.origin}",))
    received: asyncio.Queue[Received] = asyncio.Queue()
    await bus.consume(spec, [_recorder(received)], prefetch=4)

    await bus.publish_event(Pong(text="not for this consumer"), subject=str(uuid.uuid4()))
    sent = await bus.publish_event(Ping(text="for this consumer"), subject=str(uuid.uuid4()))

    envelope, _ = await _next(received)
    assert envelope.id == sent.id
    dead_letters = await _dead_letter_queue(channel, spec)
    assert await dead_letters.get(no_ack=True, fail=False) is None


async def test_duplicate_delivery_reaches_the_handler_twice_with_the_same_id(
    make_bus: BusFactory, channel: AbstractChannel, queue_specs: list[QueueSpec]
) -> None:
    """At-least-once: the bus does not deduplicate. Handlers must be idempotent on the
    envelope id / content (invariant 8); the store's fenced write does that for state."""
    bus = await make_bus()
    routing_key = f"test.ping.{bus.origin}"
    spec = _spec(queue_specs, event_bindings=(routing_key,))
    received: asyncio.Queue[Received] = asyncio.Queue()
    await bus.consume(spec, [_recorder(received)], prefetch=4)

    envelope = new_envelope(Ping(text="twice"), source="test/bus", subject=str(uuid.uuid4()))
    events = await channel.get_exchange(EVENTS_EXCHANGE)
    for _ in range(2):
        await events.publish(
            aio_pika.Message(
                encode(envelope),
                message_id=str(envelope.id),
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            ),
            routing_key=routing_key,
        )

    first, _ = await _next(received)
    second, _ = await _next(received)
    assert first.id == second.id == envelope.id
    assert first == second


async def _start_slow_consumer(
    bus: BusClient, spec: QueueSpec, handler_s: float
) -> tuple[Consumer, asyncio.Event, list[str]]:
    started = asyncio.Event()
    outcome: list[str] = []

    async def slow(envelope: Envelope[Any], delivery: Delivery) -> None:
        started.set()
        try:
            await asyncio.sleep(handler_s)
        except asyncio.CancelledError:
            outcome.append("cancelled")
            raise
        outcome.append("finished")

    consumer = await bus.consume(spec, [Route(Ping, slow)], prefetch=1)
    return consumer, started, outcome


async def test_stop_waits_for_the_handler_in_flight_then_acks(
    make_bus: BusFactory, channel: AbstractChannel, queue_specs: list[QueueSpec]
) -> None:
    bus = await make_bus()
    spec = _spec(queue_specs, event_bindings=(f"test.ping.{bus.origin}",))
    consumer, started, outcome = await _start_slow_consumer(bus, spec, handler_s=1.0)
    await bus.publish_event(Ping(text="slow"), subject=str(uuid.uuid4()))
    async with asyncio.timeout(WAIT_S):
        await started.wait()

    before = time.monotonic()
    await consumer.stop(grace_s=10.0)
    waited = time.monotonic() - before

    assert outcome == ["finished"]
    assert 0.5 < waited < 5.0
    # Acked before the channel closed: nothing comes back.
    queue = await channel.declare_queue(spec.name, passive=True)
    await asyncio.sleep(0.3)
    assert await queue.get(no_ack=True, fail=False) is None


async def test_stop_cancels_a_handler_that_outlives_the_grace_and_requeues_it(
    make_bus: BusFactory, channel: AbstractChannel, queue_specs: list[QueueSpec]
) -> None:
    bus = await make_bus()
    spec = _spec(queue_specs, event_bindings=(f"test.ping.{bus.origin}",))
    consumer, started, outcome = await _start_slow_consumer(bus, spec, handler_s=60.0)
    sent = await bus.publish_event(Ping(text="stuck"), subject=str(uuid.uuid4()))
    async with asyncio.timeout(WAIT_S):
        await started.wait()

    before = time.monotonic()
    await consumer.stop(grace_s=0.5)
    waited = time.monotonic() - before

    assert outcome == ["cancelled"]
    assert 0.4 < waited < 3.0
    # Not acked: the message is back in the queue for another replica.
    requeued = await _get_one(await channel.declare_queue(spec.name, passive=True))
    assert requeued.message_id == str(sent.id)
    assert requeued.redelivered


async def _reply_queue(channel: AbstractChannel) -> AbstractQueue:
    """An exclusive queue bound on the replies exchange, as a raw caller would have."""
    name = reply_queue_name("test", uuid.uuid4().hex[:12])
    queue = await channel.declare_queue(name, exclusive=True)
    await queue.bind(REPLIES_EXCHANGE, routing_key=name)
    return queue


async def _send_raw_command(
    channel: AbstractChannel, command_key: str, body: bytes, reply_to: str, **headers: Any
) -> str:
    correlation_id = uuid.uuid4().hex
    commands = await channel.get_exchange(COMMANDS_EXCHANGE)
    await commands.publish(
        aio_pika.Message(
            body,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            reply_to=reply_to,
            correlation_id=correlation_id,
            headers=headers,
        ),
        routing_key=command_key,
    )
    return correlation_id


@pytest.mark.parametrize(
    ("body", "code"),
    [
        pytest.param(b"\xff\xfe\x00 not json", RejectionCode.UNDECODABLE, id="garbage-bytes"),
        pytest.param(
            b'{"id": "1", "type": "test.ping", "subject": "vm-1", "schema_version": 1, "data": {}}',
            RejectionCode.INVALID,
            id="bad-payload",
        ),
        pytest.param(
            b'{"id": "1", "type": "test.ping", "schema_version": 99, "data": {"text": "x"}}',
            RejectionCode.INVALID,
            id="unknown-schema-version",
        ),
        pytest.param(
            b'{"id": "1", "type": "test.nobody", "subject": "vm-1", "schema_version": 1, '
            b'"data": {}}',
            RejectionCode.UNKNOWN_TYPE,
            id="unknown-type",
        ),
    ],
)
async def test_a_command_that_cannot_be_taken_is_answered_then_dead_lettered(
    body: bytes,
    code: RejectionCode,
    make_bus: BusFactory,
    channel: AbstractChannel,
    queue_specs: list[QueueSpec],
) -> None:
    command_key, spec, received = await _ping_consumer(make_bus, queue_specs)
    replies = await _reply_queue(channel)

    correlation_id = await _send_raw_command(channel, command_key, body, replies.name)

    answer = await _get_one(replies)
    assert answer.correlation_id == correlation_id
    rejected = decode(answer.body, CommandRejected)
    assert rejected.data.code is code
    assert rejected.data.ok is False
    assert rejected.data.error
    parked = await _get_one(await _dead_letter_queue(channel, spec))
    assert parked.body == body
    assert received.empty()


async def test_a_caller_learns_at_once_that_its_command_type_is_not_handled(
    make_bus: BusFactory, queue_specs: list[QueueSpec]
) -> None:
    caller = await make_bus()
    target, _spec_of_target, _received = await _ping_consumer(make_bus, queue_specs)

    with pytest.raises(CommandRejectedError, match=r"test\.pong") as rejected:
        # A long timeout: only the rejection can end this call early.
        await caller.call(target, Pong(text="x"), Pong, subject="vm-1", timeout_s=WAIT_S * 4)
    assert rejected.value.code is RejectionCode.UNKNOWN_TYPE


async def test_an_expired_command_is_answered_and_dropped_not_dead_lettered(
    make_bus: BusFactory, channel: AbstractChannel, queue_specs: list[QueueSpec]
) -> None:
    command_key, spec, received = await _ping_consumer(make_bus, queue_specs)
    replies = await _reply_queue(channel)
    envelope = new_envelope(Ping(text="late"), source="test", subject="vm-1")
    past = int((time.time() - 60) * 1000)

    await _send_raw_command(
        channel, command_key, encode(envelope), replies.name, **{DEADLINE_HEADER: past}
    )

    rejected = decode((await _get_one(replies)).body, CommandRejected)
    assert rejected.data.code is RejectionCode.EXPIRED
    assert rejected.subject == "vm-1"
    await asyncio.sleep(0.5)
    assert received.empty()
    assert await (await _dead_letter_queue(channel, spec)).get(no_ack=True, fail=False) is None
