"""The hook socket's protocol: one JSON request line, one JSON reply line, per connection.

The hook (``qemu_hook.py``) speaks it with the standard library only, so the shapes here are
plain JSON objects; ``v`` is the protocol version, and a request of another version gets a
reply saying so instead of being guessed at.
"""

from __future__ import annotations

import enum
import json

from pydantic import BaseModel, ConfigDict, Field, ValidationError

PROTOCOL_VERSION = 1
MAX_REQUEST_BYTES = 512 * 1024
"""A domain XML is at most 256 KiB on the bus; twice that leaves room for the envelope."""


class HookProtocolError(ValueError):
    """A request line that is not a valid request of this protocol version."""


class HookPhase(enum.StrEnum):
    """The libvirt hook calls the agent acts on."""

    PREPARE = "prepare"
    """``prepare begin``: before libvirt sets up the domain (and runs ``swtpm_setup``)."""
    MIGRATE_IN = "migrate-in"
    """``migrate begin``: an incoming live migration; its ``prepare begin`` follows."""
    RELEASE = "release"
    """``release end``: the domain stopped, swtpm is gone, its files are still there."""


class HookRequest(BaseModel):
    """What the hook sends."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    v: int = Field(description="Protocol version.")
    phase: HookPhase = Field(description="Which hook call this is.")
    name: str = Field(max_length=256, description="The domain name libvirt passed.")
    xml: str = Field(max_length=MAX_REQUEST_BYTES, description="The domain XML from stdin.")


class HookReply(BaseModel):
    """What the agent answers; ``ok`` False makes ``prepare`` refuse the start."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    v: int = Field(default=PROTOCOL_VERSION, description="Protocol version.")
    ok: bool = Field(description="Whether the start may go on (ignored for stop phases).")
    message: str = Field(default="", max_length=1024, description="Shown in libvirt's error.")


def parse_request(line: bytes) -> HookRequest:
    """The request in ``line``; raises `HookProtocolError` for anything else."""
    try:
        data = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise HookProtocolError(f"not a JSON line: {error}") from None
    if not isinstance(data, dict):
        raise HookProtocolError("not a JSON object")
    if data.get("v") != PROTOCOL_VERSION:
        raise HookProtocolError(
            f"protocol version {data.get('v')!r} not spoken here (agent speaks "
            f"{PROTOCOL_VERSION}); install the hook of this agent's version"
        )
    try:
        return HookRequest.model_validate(data)
    except ValidationError as error:
        raise HookProtocolError(f"not a valid request: {error.errors()[0]['msg']}") from None


def encode_reply(reply: HookReply) -> bytes:
    """The reply as one JSON line."""
    return reply.model_dump_json().encode() + b"\n"
