"""Every message model of the bus, found by walking ``keeper_shared.messages``, and its role."""

from __future__ import annotations

import enum
import importlib
import pkgutil

import keeper_shared.messages
from keeper_devtools.contract.commands import COMMANDS, replies
from keeper_shared.messages.envelope import Payload


class MessageRole(enum.StrEnum):
    """How a message travels."""

    EVENT = "event"
    """A fact, published to the events exchange with the key ``<type>.<origin>``."""
    COMMAND = "command"
    """An imperative for a service or a host, answered on the caller's reply queue."""
    REPLY = "reply"
    """The answer to a command, sent to the caller's reply queue."""


def role_of(cls: type[Payload]) -> MessageRole:
    """The role of a message; anything the command table does not name as a command or a
    reply is an event (a fact in the past tense, as the design asks)."""
    if cls in COMMANDS:
        return MessageRole.COMMAND
    if cls in replies():
        return MessageRole.REPLY
    return MessageRole.EVENT


def discover_payloads() -> list[type[Payload]]:
    """Every concrete message model under ``keeper_shared.messages``, sorted by type."""
    package = keeper_shared.messages
    for module in pkgutil.walk_packages(package.__path__, prefix=f"{package.__name__}."):
        importlib.import_module(module.name)
    found: dict[str, type[Payload]] = {}
    pending: list[type[Payload]] = list(Payload.__subclasses__())
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        if not cls.__module__.startswith(f"{package.__name__}."):
            continue
        message_type = getattr(cls, "message_type", None)
        if not isinstance(message_type, str):
            continue  # an abstract family base
        other = found.get(message_type)
        if other is not None and other is not cls:
            raise ValueError(f"{message_type!r} is both {other.__name__} and {cls.__name__}")
        found[message_type] = cls
    return [found[name] for name in sorted(found)]
