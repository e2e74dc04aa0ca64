"""The contract's command table agrees with the services' handlers, and every command's
operation in the AsyncAPI document names its reply, its error reply and its follow-ups."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import typing
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from keeper_devtools.contract import (
    COMMANDS,
    ERROR_REPLY,
    MessageRole,
    Receiver,
    build_document,
    discover_payloads,
    message_id,
    role_of,
)
from keeper_devtools.contract.asyncapi import FOLLOW_UP_KEY, REPLIES_CHANNEL, command_operation_id
from keeper_shared.messages.envelope import Envelope, Payload

SERVICE_PACKAGES = ("keeper_host_agent", "keeper_state_store", "keeper_policy")


def _functions(module: Any) -> Iterator[tuple[str, Callable[..., Any]]]:
    """The module's own functions and its own classes' methods, by qualified name."""
    for name, member in inspect.getmembers(module):
        if getattr(member, "__module__", None) != module.__name__:
            continue
        if inspect.isfunction(member):
            yield f"{module.__name__}.{name}", member
        elif inspect.isclass(member):
            for method_name, method in inspect.getmembers(member, inspect.isfunction):
                yield f"{module.__name__}.{member.__name__}.{method_name}", method


def _envelope_payload(annotation: Any) -> type[Payload] | None:
    """``X`` of an ``Envelope[X]`` annotation (pydantic keeps it in its generic metadata)."""
    metadata = getattr(annotation, "__pydantic_generic_metadata__", None)
    if not metadata or metadata["origin"] is not Envelope:
        return None
    (payload,) = metadata["args"]
    return payload if isinstance(payload, type) and issubclass(payload, Payload) else None


def service_handlers() -> dict[str, tuple[type[Payload], Any]]:
    """Every function of the services that takes an ``envelope: Envelope[X]``: its message
    type and its return annotation (a reply model, or None for an event handler)."""
    handlers: dict[str, tuple[type[Payload], Any]] = {}
    for package_name in SERVICE_PACKAGES:
        package = importlib.import_module(package_name)
        for info in pkgutil.walk_packages(package.__path__, prefix=f"{package_name}."):
            if info.name.endswith(".__main__"):
                continue
            for name, function in _functions(importlib.import_module(info.name)):
                if "envelope" not in inspect.signature(function).parameters:
                    continue
                hints = typing.get_type_hints(function)
                payload = _envelope_payload(hints.get("envelope"))
                if payload is not None:
                    handlers[name] = (payload, hints.get("return"))
    return handlers


@pytest.fixture(scope="module")
def handlers() -> dict[str, tuple[type[Payload], Any]]:
    return service_handlers()


def test_every_handler_that_replies_handles_a_command_of_the_table(
    handlers: dict[str, tuple[type[Payload], Any]],
) -> None:
    """A service handler that answers is a command's: a new one must be in the table, with
    the reply the handler really returns."""
    answering = {name: found for name, found in handlers.items() if found[1] is not type(None)}
    assert answering, "no handler found: the scan is broken"
    for name, (payload, returned) in answering.items():
        assert payload in COMMANDS, (
            f"{name} answers {payload.message_type} with {returned}: add {payload.__name__} "
            "to keeper_devtools.contract.commands.COMMANDS, then regenerate docs/asyncapi.json"
        )
        assert returned is COMMANDS[payload].reply, (
            f"{name} answers {payload.message_type} with {returned}, the table says "
            f"{COMMANDS[payload].reply.__name__}"
        )


def test_every_command_of_the_table_has_a_handler(
    handlers: dict[str, tuple[type[Payload], Any]],
) -> None:
    handled = {payload for payload, returned in handlers.values() if returned is not type(None)}
    assert set(COMMANDS) - handled == set()


def test_the_table_names_replies_and_events_where_it_should() -> None:
    payloads = set(discover_payloads())
    for command, contract in COMMANDS.items():
        assert command in payloads
        assert contract.receivers, f"{command.__name__} goes nowhere"
        assert role_of(contract.reply) is MessageRole.REPLY
        assert contract.reply not in COMMANDS
        for event in contract.follow_up_events:
            assert role_of(event) is MessageRole.EVENT, f"{event.__name__} is not an event"
    assert role_of(ERROR_REPLY) is MessageRole.REPLY


def test_every_command_operation_names_its_reply_and_error_reply() -> None:
    assert FOLLOW_UP_KEY == "x-keeper-follow-up-events"  # as docs/integrating.md names it
    document = build_document()
    operations = document["operations"]
    for command, contract in COMMANDS.items():
        for receiver in contract.receivers:
            operation = operations[command_operation_id(receiver, command)]
            assert operation["action"] == "receive"
            assert operation["channel"] == {"$ref": f"#/channels/{receiver.value}"}
            assert operation["messages"] == [
                {"$ref": f"#/channels/{receiver.value}/messages/{message_id(command)}"}
            ]
            reply = operation["reply"]
            assert reply["channel"] == {"$ref": f"#/channels/{REPLIES_CHANNEL}"}
            assert reply["messages"] == [
                {"$ref": f"#/channels/{REPLIES_CHANNEL}/messages/{message_id(answer)}"}
                for answer in (contract.reply, ERROR_REPLY)
            ]
            assert operation[FOLLOW_UP_KEY] == [
                event.message_type for event in contract.follow_up_events
            ]
    commands = [name for name, operation in operations.items() if operation["action"] == "receive"]
    assert len(commands) == sum(len(contract.receivers) for contract in COMMANDS.values())


def test_each_receiver_channel_carries_exactly_its_commands() -> None:
    channels = build_document()["channels"]
    for receiver in Receiver:
        expected = {
            message_id(command)
            for command, contract in COMMANDS.items()
            if receiver in contract.receivers
        }
        assert set(channels[receiver.value]["messages"]) == expected
    replies = {message_id(cls) for cls in discover_payloads() if role_of(cls) is MessageRole.REPLY}
    assert set(channels[REPLIES_CHANNEL]["messages"]) == replies
