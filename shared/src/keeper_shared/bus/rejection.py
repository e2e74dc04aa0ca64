"""What a receiver answers to a command it cannot take: ``command.rejected`` with a code
(the caller's side, ``CommandRejectedError``, is in ``client``)."""

from __future__ import annotations

import json

from keeper_shared.messages.commands import CommandRejected, RejectionCode
from keeper_shared.messages.envelope import MAX_MESSAGE_BYTES, MessageError, peek_type

UNKNOWN_SUBJECT = "unknown"
"""The subject of a rejection whose command's subject could not be read."""


def command_subject(body: bytes) -> str:
    """The subject a command names, for its rejection to echo; ``unknown`` if unreadable."""
    if len(body) > MAX_MESSAGE_BYTES:
        return UNKNOWN_SUBJECT
    try:
        document = json.loads(body)
    except ValueError:
        return UNKNOWN_SUBJECT
    subject = document.get("subject") if isinstance(document, dict) else None
    return subject[:256] if isinstance(subject, str) else UNKNOWN_SUBJECT


def rejection(body: bytes, known_types: set[str], error: MessageError | None) -> CommandRejected:
    """Why the command in ``body`` cannot be taken: ``error`` is what decoding raised (None
    when the type is one nobody on this queue handles)."""
    try:
        command_type: str | None = peek_type(body)
    except MessageError as unreadable:
        return CommandRejected(code=RejectionCode.UNDECODABLE, error=str(unreadable)[:1024])
    if error is None or command_type not in known_types:
        return CommandRejected(
            code=RejectionCode.UNKNOWN_TYPE,
            error=f"this receiver does not handle {command_type!r}"[:1024],
            command_type=command_type,
        )
    return CommandRejected(
        code=RejectionCode.INVALID, error=str(error)[:1024], command_type=command_type
    )
