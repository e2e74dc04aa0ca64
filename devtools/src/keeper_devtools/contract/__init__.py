"""The message contract: an AsyncAPI 3.0 document generated from the pydantic models.

``python -m keeper_devtools.contract`` writes ``docs/asyncapi.json``; ``--check`` only tells
whether the committed file is current. Every :class:`Payload` subclass under
``keeper_shared.messages`` is found by walking the package, so a new message is in the
document as soon as its module exists; a new command must also be named in the command
table (:mod:`keeper_devtools.contract.commands`) with its reply and follow-up events.
"""

from keeper_devtools.contract.asyncapi import build_document, message_id, render
from keeper_devtools.contract.catalogue import MessageRole, discover_payloads, role_of
from keeper_devtools.contract.commands import COMMANDS, ERROR_REPLY, CommandContract, Receiver

__all__ = [
    "COMMANDS",
    "ERROR_REPLY",
    "CommandContract",
    "MessageRole",
    "Receiver",
    "build_document",
    "discover_payloads",
    "message_id",
    "render",
    "role_of",
]
