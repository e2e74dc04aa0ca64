"""The reply every command gets when it has nothing richer to return, and the one it gets
when its receiver could not take it at all."""

from __future__ import annotations

import enum
from typing import Literal

from pydantic import Field

from keeper_shared.messages.envelope import Payload


class CommandDone(Payload):
    """Outcome of a command: done, or refused/failed with a reason safe to log."""

    message_type = "command.done"

    ok: bool = Field(description="True when the command was carried out.")
    error: str | None = Field(default=None, description="Why not, when ok is False.")
    detail: dict[str, str] = Field(default_factory=dict, description="Small facts worth showing.")


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
