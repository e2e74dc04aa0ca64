"""The message contract: an AsyncAPI document generated from the pydantic models.

``python -m keeper_devtools.contract`` writes ``docs/asyncapi.json``; ``--check`` only tells
whether the committed file is current. Every :class:`Payload` subclass under
``keeper_shared.messages`` is found by walking the package, so a new message is in the
document as soon as its module exists.
"""

from keeper_devtools.contract.asyncapi import (
    MessageRole,
    build_document,
    discover_payloads,
    render,
    role_of,
)

__all__ = ["MessageRole", "build_document", "discover_payloads", "render", "role_of"]
