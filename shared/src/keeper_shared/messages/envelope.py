"""The CloudEvents-style envelope every message travels in, and its strict decoder.

Decoding never lets a pydantic error text escape as is: pydantic puts the offending input
into its messages, and that input can be TPM bytes (invariant 4). :class:`MessageError`
carries only field locations and error kinds.
"""

from __future__ import annotations

import functools
import json
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, ClassVar, Generic, TypeVar, cast

from pydantic import BaseModel, ConfigDict, Field, ValidationError

MAX_MESSAGE_BYTES = 8 * 1024 * 1024
"""Largest body accepted from the bus; a prepare with TPM + 4 MB NVRAM fits compressed."""


class MessageError(ValueError):
    """A body that is not a valid message of the expected type. Safe to log."""


class NotExpressibleError(MessageError):
    """A message its receiver's release cannot read (a type it does not know, or a field
    set that its older schema has no place for). The sender refuses it, so it is never
    dead-lettered at the receiver. Safe to log."""


class Payload(BaseModel):
    """Base of every message body; subclasses name their type and schema version."""

    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)

    message_type: ClassVar[str]
    schema_version: ClassVar[int] = 1


P = TypeVar("P", bound=Payload)


class Envelope(BaseModel, Generic[P]):
    """CloudEvents-style attributes around one payload."""

    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)

    id: uuid.UUID = Field(description="Unique per message; redeliveries keep it.")
    type: str = Field(description="What happened (event) or what to do (command).")
    source: str = Field(description="Who sent it: `host-agent/<host>`, `state-store`, ...")
    time: datetime = Field(description="When the sender created it (UTC).")
    subject: str = Field(description="What it is about: a VM id, or a host id.")
    schema_version: int = Field(description="Version of the payload schema.")
    data: P = Field(description="The payload.")


@functools.cache
def envelope_of(payload_type: type[Payload]) -> type[Envelope[Any]]:
    """``Envelope`` parametrised with ``payload_type``, built once per process.

    pydantic keeps its parametrised generics in a context variable: a task started in a
    context of its own (a shared call serving many events, see the store's coalescer) found
    it empty and rebuilt the envelope's whole schema for each message it sent, a seventh of
    the store's CPU per version."""
    return cast(type[Envelope[Any]], cast(Any, Envelope)[payload_type])


def new_envelope(payload: P, *, source: str, subject: str) -> Envelope[P]:
    """Wrap ``payload`` in a fresh envelope."""
    # Parametrise with the payload's own class so serialisation uses its field serialisers.
    envelope_type = envelope_of(type(payload))
    return cast(
        Envelope[P],
        envelope_type(
            id=uuid.uuid4(),
            type=payload.message_type,
            source=source,
            time=datetime.now(UTC),
            subject=subject,
            schema_version=payload.schema_version,
            data=payload,
        ),
    )


def encode(envelope: Envelope[Any], *, version: int | None = None) -> bytes:
    """Serialise for the wire (JSON; secret bytes as base64, see ``SecretBlob``), at
    ``version`` of its schema when that is older than the payload's (the receiver's release
    reads no newer: see ``keeper_shared.messages.releases``). Raises NotExpressibleError
    when the data cannot be told at that version."""
    if version is None or version >= envelope.schema_version:
        return envelope.model_dump_json().encode()
    document = json.loads(envelope.model_dump_json())
    document["data"] = _downcast(envelope.type, document["data"], envelope.schema_version, version)
    document["schema_version"] = version
    return json.dumps(document).encode()


def _safe_errors(error: ValidationError) -> str:
    """Describe a validation error by location and kind only, never by input value."""
    parts = []
    for item in error.errors(include_url=False, include_input=False, include_context=False):
        location = ".".join(str(part) for part in item["loc"]) or "<root>"
        parts.append(f"{location}: {item['type']}")
    return "; ".join(parts[:10])


Upcaster = Callable[[dict[str, Any]], dict[str, Any]]
"""Turns the ``data`` of a message at one schema version into the next version's."""

_UPCASTERS: dict[tuple[str, int], Upcaster] = {}


def _registrar(
    steps: dict[tuple[str, int], Upcaster], what: str, message_type: str, from_version: int
) -> Callable[[Upcaster], Upcaster]:
    """A decorator that files one schema step of ``message_type`` in ``steps`` (the
    upcasters or the downcasters); a second, different step for the same version is an
    error."""

    def register(step: Upcaster) -> Upcaster:
        key = (message_type, from_version)
        if key in steps and steps[key] is not step:
            raise ValueError(f"{what} for {message_type} v{from_version} already exists")
        steps[key] = step
        return step

    return register


def register_upcaster(message_type: str, from_version: int) -> Callable[[Upcaster], Upcaster]:
    """Register (as a decorator) how ``message_type`` data moves from ``from_version`` to
    ``from_version + 1``. When a payload's ``schema_version`` is raised, register the step
    from the old version next to the model, so messages still in queues (or sent by hosts
    not yet upgraded) are read: :func:`decode` applies the steps one version at a time
    before validating."""

    return _registrar(_UPCASTERS, "an upcaster", message_type, from_version)


def unregister_upcaster(message_type: str, from_version: int) -> None:
    """Forget an upcaster (for tests)."""
    _UPCASTERS.pop((message_type, from_version), None)


Downcaster = Callable[[dict[str, Any]], dict[str, Any]]
"""Turns the ``data`` of a message at one schema version into the previous version's;
raises NotExpressibleError when the data has no equivalent there."""

_DOWNCASTERS: dict[tuple[str, int], Downcaster] = {}


def register_downcaster(message_type: str, from_version: int) -> Callable[[Downcaster], Downcaster]:
    """Register (as a decorator) how ``message_type`` data moves from ``from_version`` down
    to ``from_version - 1``, so it can be sent to a receiver of an older release during a
    rolling upgrade. Register it beside the upcaster of the same step; a step without one
    cannot be sent to the older release at all (the sender refuses)."""

    return _registrar(_DOWNCASTERS, "a downcaster", message_type, from_version)


def unregister_downcaster(message_type: str, from_version: int) -> None:
    """Forget a downcaster (for tests)."""
    _DOWNCASTERS.pop((message_type, from_version), None)


def _downcast(
    message_type: str, data: dict[str, Any], from_version: int, to_version: int
) -> dict[str, Any]:
    """``data`` brought down from ``from_version`` to ``to_version``, one step at a time."""
    problem: str | None = None
    version = from_version
    while version > to_version:
        downcaster = _DOWNCASTERS.get((message_type, version))
        if downcaster is None:
            raise NotExpressibleError(
                f"{message_type} v{from_version} cannot be sent as v{to_version}: no "
                f"downcaster from v{version}"
            )
        try:
            data = downcaster(dict(data))
        except NotExpressibleError:
            raise
        except Exception as error:  # the text of a downcaster's error may quote the data
            problem = type(error).__name__
        if problem is not None:
            break
        version -= 1
    if problem is not None:
        raise NotExpressibleError(f"{message_type} v{version} could not be downcast ({problem})")
    return data


def _upcast(body: bytes, header: _EnvelopeHeader, target_version: int) -> bytes:
    """``body`` with its data brought from ``header.schema_version`` to ``target_version``."""
    problem: str | None = None
    try:
        document = json.loads(body)
    except ValueError:
        document = None
    if not isinstance(document, dict) or not isinstance(document.get("data"), dict):
        raise MessageError(f"invalid {header.type} message (data: not an object)")
    data: dict[str, Any] = document["data"]
    version = header.schema_version
    while version < target_version:
        upcaster = _UPCASTERS.get((header.type, version))
        if upcaster is None:
            raise MessageError(
                f"{header.type} schema version {header.schema_version} is not supported "
                f"(this build reads {target_version}; no upcaster from v{version})"
            )
        try:
            data = upcaster(dict(data))
        except Exception as error:  # the text of an upcaster's error may quote the input
            problem = type(error).__name__
        if problem is not None:
            break
        version += 1
    # Raised outside the except block: the upcaster's exception may hold the raw input.
    if problem is not None:
        raise MessageError(f"{header.type} v{version} could not be upcast ({problem})")
    document["data"] = data
    document["schema_version"] = target_version
    return json.dumps(document).encode()


def decode(body: bytes, payload_type: type[P]) -> Envelope[P]:
    """Parse a wire body into an envelope carrying ``payload_type``, or raise MessageError."""
    if len(body) > MAX_MESSAGE_BYTES:
        raise MessageError(f"message of {len(body)} bytes exceeds {MAX_MESSAGE_BYTES}")
    header = _read_header(body)
    if header.type != payload_type.message_type:
        raise MessageError(f"expected {payload_type.message_type!r}, got {header.type[:64]!r}")
    if 0 < header.schema_version < payload_type.schema_version:
        body = _upcast(body, header, payload_type.schema_version)
    elif header.schema_version != payload_type.schema_version:
        raise MessageError(
            f"{header.type} schema version {header.schema_version} is not supported "
            f"(this build reads {payload_type.schema_version})"
        )
    # The MessageError is raised outside the except block so it carries no __context__:
    # the ValidationError holds the raw input, which may be secret.
    try:
        return envelope_of(payload_type).model_validate_json(body)
    except ValidationError as error:
        problem = _safe_errors(error)
    raise MessageError(f"invalid {header.type} message ({problem})")


def peek_type(body: bytes) -> str:
    """The message type of a body, for routing a queue that carries several types."""
    return _read_header(body).type


def _read_header(body: bytes) -> _EnvelopeHeader:
    try:
        return _EnvelopeHeader.model_validate_json(body)
    except ValidationError as error:
        problem = _safe_errors(error)
    raise MessageError(f"not a message envelope ({problem})")


class _EnvelopeHeader(BaseModel):
    """The envelope without its payload, read first to pick the payload model."""

    model_config = ConfigDict(extra="ignore", hide_input_in_errors=True)

    type: str = Field(max_length=128)
    schema_version: int
