"""The reply every command gets when it has nothing richer to return."""

from __future__ import annotations

from pydantic import Field

from keeper_shared.messages.envelope import Payload


class CommandDone(Payload):
    """Outcome of a command: done, or refused/failed with a reason safe to log."""

    message_type = "command.done"

    ok: bool = Field(description="True when the command was carried out.")
    error: str | None = Field(default=None, description="Why not, when ok is False.")
    detail: dict[str, str] = Field(default_factory=dict, description="Small facts worth showing.")
