"""A host agent carries out commands only from the users allowed to send them: another
user's command (an integrator's, which may write the commands exchange) is answered
``command.rejected`` with code ``forbidden`` and dead-lettered, never handled."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import Field

from keeper_shared.bus.client import CommandRejectedError, Delivery, Route
from keeper_shared.bus.senders import only_from
from keeper_shared.bus.topology import QueueSpec
from keeper_shared.messages.commands import CommandOutcome, RejectionCode
from keeper_shared.messages.envelope import Envelope, Payload
from support.memory_bus import MemoryBroker

COMMANDS = QueueSpec(name="test.host.commands", command_key="host.test", delivery_limit=1)


class Undefine(Payload):
    """A test command."""

    message_type = "test.undefine"

    vm: str = Field(description="Which VM.")


class Undefined(CommandOutcome):
    """The test command's reply."""

    message_type = "test.undefine.reply"


async def serve(broker: MemoryBroker, allowed: list[str], handled: list[str]) -> None:
    async def undefine(envelope: Envelope[Any], delivery: Delivery) -> Undefined:
        handled.append(envelope.data.vm)
        return Undefined(ok=True)

    agent = broker.client(source="host-agent/test", origin="host-test")
    await agent.consume(COMMANDS, only_from(allowed, [Route(Undefine, undefine)]), prefetch=1)


async def test_a_command_from_an_allowed_user_is_carried_out() -> None:
    broker, handled = MemoryBroker(), list[str]()
    await serve(broker, ["keeper-policy", "keeper-store"], handled)
    policy = broker.client(source="policy/1", origin="policy", user_id="keeper-policy")

    reply = await policy.call("host.test", Undefine(vm="a"), Undefined, subject="a", timeout_s=5)

    assert reply.data.ok
    assert handled == ["a"]


async def test_another_users_command_is_rejected_as_forbidden_and_dead_lettered() -> None:
    broker, handled = MemoryBroker(), list[str]()
    await serve(broker, ["keeper-policy", "keeper-store"], handled)
    integrator = broker.client(source="integrator/x", origin="auto-1", user_id="auto-1")

    with pytest.raises(CommandRejectedError) as rejected:
        await integrator.call("host.test", Undefine(vm="a"), Undefined, subject="a", timeout_s=5)

    assert rejected.value.code is RejectionCode.FORBIDDEN
    assert "auto-1" in rejected.value.reason
    assert handled == []
    assert len(broker.dead_lettered(COMMANDS)) == 1


async def test_no_allowed_users_checks_nothing() -> None:
    """A stack whose services share one user (development) leaves the list empty."""
    broker, handled = MemoryBroker(), list[str]()
    await serve(broker, [], handled)
    anyone = broker.client(source="cli/x", origin="client", user_id="guest")

    reply = await anyone.call("host.test", Undefine(vm="b"), Undefined, subject="b", timeout_s=5)

    assert reply.data.ok
    assert handled == ["b"]
