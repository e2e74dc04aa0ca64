"""The in-memory bus double routes and settles messages as the real topology and the real
client's ack discipline do (the handler tests built on it are only as good as this)."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import Field

from keeper_shared.bus.client import CallTimeoutError, Delivery, NoRouteError, Route
from keeper_shared.bus.topology import QueueSpec
from keeper_shared.messages.envelope import Envelope, Payload
from support.memory_bus import MemoryBroker, MemoryMessage, topic_matches


class Ping(Payload):
    """A test event or command."""

    message_type = "test.ping"

    text: str = Field(description="Anything.")


class Pong(Payload):
    """A test reply."""

    message_type = "test.pong"

    text: str = Field(description="The ping's text, echoed.")


EVENTS = QueueSpec(name="test.events", event_bindings=("test.*.*",), delivery_limit=1)
COMMANDS = QueueSpec(name="test.commands", command_key="test-service", delivery_limit=1)


@pytest.mark.parametrize(
    ("pattern", "key", "matches"),
    [
        ("vm.*.*", "vm.started.host-a", True),
        ("vm.*.*", "vm.started", False),
        ("state.changed.*", "state.changed.host-a", True),
        ("state.changed.*", "state.persisted.host-a", False),
        ("#", "a.b.c", True),
        ("a.#", "a", True),
        ("a.#.c", "a.b.b.c", True),
        ("a.#.c", "a.b.b.d", False),
    ],
)
def test_topic_patterns_match_as_amqp_topics_do(pattern: str, key: str, matches: bool) -> None:
    assert topic_matches(pattern, key) is matches


async def test_an_event_reaches_the_queue_bound_to_its_topic() -> None:
    broker = MemoryBroker()
    seen: list[tuple[str, str | None]] = []

    async def record(envelope: Envelope[Any], delivery: Delivery) -> None:
        seen.append((envelope.data.text, delivery.user_id))

    consumer = broker.client(source="test/consumer", origin="consumer")
    await consumer.consume(EVENTS, [Route(Ping, record)], prefetch=1)
    publisher = broker.client(source="test/host", origin="host-a")
    await publisher.publish_event(Ping(text="hello"), subject="vm")
    await broker.settled()
    assert seen == [("hello", "host-a")]
    assert broker.events[0][0] == "test.ping.host-a"


async def test_a_command_gets_its_handlers_reply() -> None:
    broker = MemoryBroker()

    async def echo(envelope: Envelope[Any], delivery: Delivery) -> Pong:
        return Pong(text=envelope.data.text)

    service = broker.client(source="test/service", origin="test-service")
    await service.consume(COMMANDS, [Route(Ping, echo)], prefetch=1)
    caller = broker.client(source="test/caller", origin="caller")
    reply = await caller.call("test-service", Ping(text="x"), Pong, subject="vm", timeout_s=5)
    assert reply.data.text == "x"


async def test_a_reply_from_another_user_does_not_count() -> None:
    broker = MemoryBroker()

    async def echo(envelope: Envelope[Any], delivery: Delivery) -> Pong:
        return Pong(text="forged")

    impostor = broker.client(source="test/impostor", origin="test-service", user_id="host-b")
    await impostor.consume(COMMANDS, [Route(Ping, echo)], prefetch=1)
    caller = broker.client(source="test/caller", origin="caller")
    with pytest.raises(CallTimeoutError):
        await caller.call(
            "test-service", Ping(text="x"), Pong, subject="vm", timeout_s=0.5, replier="host-a"
        )


async def test_a_command_nobody_is_bound_for_fails_at_once() -> None:
    caller = MemoryBroker().client(source="test/caller", origin="caller")
    with pytest.raises(NoRouteError):
        await caller.call("nobody", Ping(text="x"), Pong, subject="vm", timeout_s=5)


async def test_a_failing_handler_is_retried_up_to_the_delivery_limit_then_dead_lettered() -> None:
    broker = MemoryBroker()
    attempts = 0

    async def fail(envelope: Envelope[Any], delivery: Delivery) -> None:
        nonlocal attempts
        attempts += 1
        raise RuntimeError("handler broke")

    consumer = broker.client(source="test/consumer", origin="consumer")
    await consumer.consume(EVENTS, [Route(Ping, fail)], prefetch=1)
    await broker.client(source="t", origin="host-a").publish_event(Ping(text="x"), subject="v")
    await broker.settled()
    assert attempts == 2  # the first delivery and one redelivery (limit 1)
    assert len(broker.dead_lettered(EVENTS)) == 1


async def test_an_undecodable_body_is_dead_lettered_at_once() -> None:
    broker = MemoryBroker()
    handled: list[str] = []

    async def record(envelope: Envelope[Any], delivery: Delivery) -> None:
        handled.append(envelope.data.text)

    consumer = broker.client(source="test/consumer", origin="consumer")
    await consumer.consume(EVENTS, [Route(Ping, record)], prefetch=1)
    publisher = broker.client(source="test/host", origin="host-a")
    await publisher.publish_event(Ping(text="ok"), subject="vm")
    await broker.settled()
    bad = broker.events[0][1].replace(b'"text":"ok"', b'"text":7')
    broker.publish_event("test.ping.host-a", MemoryMessage(body=bad, type="test.ping"))
    await broker.settled()
    assert handled == ["ok"]
    assert len(broker.dead_lettered(EVENTS)) == 1
