"""What every command's reply has in common, and the reply a command gets when its receiver
could not take it at all. Each command's own reply (its typed facts) is in
:mod:`keeper_shared.messages.replies`."""

from __future__ import annotations

import enum
from typing import Literal, Self, TypeVar

from pydantic import Field

from keeper_shared.messages.envelope import Payload


class CommandOutcome(Payload):
    """Base of the replies of commands that are carried out or refused: done, or not with a
    reason safe to log. Each subclass is one command's reply and names its own type; a
    refused or failed command's reply carries only ``ok``, ``error`` and ``timed_out`` (its
    other fields keep their defaults)."""

    ok: bool = Field(description="True when the command was carried out.")
    error: str | None = Field(default=None, description="Why not, when ok is false.")
    timed_out: bool = Field(
        default=False,
        description="True when ok is false because a service this command was relayed to "
        "(a host, the store) did not answer in time: what it was asked may still happen "
        "until the command's deadline, so look before asking again.",
    )

    @classmethod
    def failed(cls, error: str, *, timed_out: bool = False) -> Self:
        """This reply saying the command was refused or failed, and why."""
        return cls(ok=False, error=error, timed_out=timed_out)


ReplyT = TypeVar("ReplyT", bound=CommandOutcome)
"""Any command's reply, for code that answers or relays several commands alike."""


class RejectionCode(enum.StrEnum):
    """Why a receiver could not take a command at all."""

    UNDECODABLE = "undecodable"
    """Not a message envelope (not JSON, or its header is missing or malformed)."""
    UNKNOWN_TYPE = "unknown_type"
    """A type this queue's receiver does not handle."""
    INVALID = "invalid"
    """The payload fails validation, or its schema version is one the receiver cannot read."""
    EXPIRED = "expired"
    """It arrived after the deadline its sender set (``x-keeper-deadline-ms``)."""
    FORBIDDEN = "forbidden"
    """Its broker-validated sender may not send it (a host's command from a user other
    than the keeper's services)."""


class CommandRejected(Payload):
    """The reply to a command its receiver could not take (sent when the command names a
    reply address): the caller learns at once instead of waiting out its timeout. Nothing
    was done. An expired command is dropped after this reply; the others are dead-lettered
    after it, for someone to look at."""

    message_type = "command.rejected"

    ok: Literal[False] = Field(default=False, description="Always false: nothing was done.")
    code: RejectionCode = Field(description="Why the command could not be taken.")
    error: str = Field(max_length=1024, description="The reason, safe to log.")
    command_type: str | None = Field(
        default=None, max_length=128, description="The type the command named, if readable."
    )
