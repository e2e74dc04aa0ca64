"""The envelope: round trips, strict decoding, and no secret in any error text."""

from __future__ import annotations

import base64
import contextvars
import json
import uuid
from collections.abc import Callable

import pytest
from pydantic import SecretBytes

from keeper_shared.messages.envelope import MessageError, decode, encode, new_envelope, peek_type
from keeper_shared.messages.state import StateChanged
from keeper_shared.messages.types import FencingToken, StateKind
from keeper_shared.messages.vm import PrepareVm
from keeper_shared.sealing.state_blobs import open_state_blob, seal_state_blob
from keeper_shared.state_format.blobs import open_blob, seal_blob
from support.sealing_keys import new_keys

VM_ID = "6b2f7e0a-3c1d-4d6e-9a8b-1c2d3e4f5a6b"
CANARY = b"CANARY-" + bytes(range(256)) * 4


HOST_KEYS = new_keys()


def _prepare() -> PrepareVm:
    blob = seal_blob(StateKind.TPM, CANARY, FencingToken(epoch=1, generation=7))
    sealed = seal_state_blob(VM_ID, blob, HOST_KEYS.public, command_epoch=1)
    return PrepareVm(vm_id=VM_ID, name="vm1", epoch=1, tpm=sealed)


def _secret_forms(secret: bytes) -> list[str]:
    return [secret.hex(), base64.b64encode(secret).decode(), repr(secret)[2:40]]


def test_round_trip_keeps_the_blob_bytes() -> None:
    envelope = new_envelope(_prepare(), source="state-store/1", subject=VM_ID)
    decoded = decode(encode(envelope), PrepareVm)
    assert decoded == envelope
    assert decoded.data.tpm is not None
    assert open_blob(open_state_blob(VM_ID, decoded.data.tpm, HOST_KEYS, command_epoch=1)) == CANARY


def test_blob_bytes_are_neither_in_repr_and_str_nor_on_the_wire() -> None:
    envelope = new_envelope(_prepare(), source="s", subject=VM_ID)
    text = repr(envelope) + str(envelope) + encode(envelope).decode()
    compressed = seal_blob(StateKind.TPM, CANARY, FencingToken(epoch=1, generation=7))
    for form in _secret_forms(compressed.compressed.get_secret_value()):
        assert form not in text


def test_wrong_type_is_refused() -> None:
    envelope = new_envelope(_prepare(), source="s", subject=VM_ID)
    with pytest.raises(MessageError, match=r"expected 'state\.changed'"):
        decode(encode(envelope), StateChanged)


def test_unknown_schema_version_is_refused_by_name() -> None:
    body = json.loads(encode(new_envelope(_prepare(), source="s", subject=VM_ID)))
    body["schema_version"] = 99
    with pytest.raises(MessageError, match="schema version 99 is not supported"):
        decode(json.dumps(body).encode(), PrepareVm)


def test_validation_error_never_quotes_the_input() -> None:
    body = json.loads(encode(new_envelope(_prepare(), source="s", subject=VM_ID)))
    secret_b64 = body["data"]["tpm"]["sealed"]["ciphertext"]
    body["data"]["tpm"]["sealed"]["ciphertext"] = secret_b64 + "!not-base64"
    body["data"]["tpm"]["content_hash"] = "zz" + secret_b64[:40]
    with pytest.raises(MessageError) as caught:
        decode(json.dumps(body).encode(), PrepareVm)
    message = str(caught.value)
    assert "ciphertext" in message
    assert secret_b64[:24] not in message
    assert caught.value.__cause__ is None
    assert caught.value.__context__ is None


@pytest.mark.parametrize(
    "damage",
    [
        lambda b64: b64 + "!",  # outside the alphabet
        lambda b64: b64[:-1],  # padding cut
        lambda b64: b64[:8] + "=" + b64[9:],  # padding inside
        lambda b64: b64[:8] + "\n" + b64[8:],  # a line break (MIME style)
        lambda b64: b64[:8] + "é" + b64[9:],  # not ASCII
    ],
)
def test_a_blob_that_is_not_strict_base64_is_refused(damage: Callable[[str], str]) -> None:
    body = json.loads(encode(new_envelope(_prepare(), source="s", subject=VM_ID)))
    ciphertext = body["data"]["tpm"]["sealed"]["ciphertext"]
    body["data"]["tpm"]["sealed"]["ciphertext"] = damage(ciphertext)
    with pytest.raises(MessageError, match=r"sealed\.ciphertext"):
        decode(json.dumps(body).encode(), PrepareVm)


@pytest.mark.parametrize(
    "vm_id",
    ["../../etc", "6B2F7E0A3C1D4D6E9A8B1C2D3E4F5A6B", "{6b2f7e0a-3c1d-4d6e-9a8b-1c2d3e4f5a6b}", ""],
)
def test_non_canonical_vm_ids_are_refused(vm_id: str) -> None:
    body = json.loads(encode(new_envelope(_prepare(), source="s", subject=VM_ID)))
    body["data"]["vm_id"] = vm_id
    with pytest.raises(MessageError, match=r"data\.vm_id"):
        decode(json.dumps(body).encode(), PrepareVm)


def test_not_json_is_refused() -> None:
    with pytest.raises(MessageError, match="not a message envelope"):
        peek_type(b"\x00\x01garbage")


def test_oversized_body_is_refused_before_parsing() -> None:
    with pytest.raises(MessageError, match="exceeds"):
        decode(b" " * (9 * 1024 * 1024), PrepareVm)


def test_a_task_in_a_context_of_its_own_reuses_the_envelope_class() -> None:
    """pydantic keeps parametrised generics per context; the store's shared calls run in
    empty contexts and rebuilt the envelope's schema for every message they sent."""
    outside = type(new_envelope(_prepare(), source="s", subject=VM_ID))

    def in_empty_context() -> tuple[type, type]:
        sent = type(new_envelope(_prepare(), source="s", subject=VM_ID))
        received = type(
            decode(encode(new_envelope(_prepare(), source="s", subject=VM_ID)), PrepareVm)
        )
        return sent, received

    assert contextvars.Context().run(in_empty_context) == (outside, outside)


def test_envelope_ids_are_unique() -> None:
    ids = {new_envelope(_prepare(), source="s", subject=VM_ID).id for _ in range(100)}
    assert len(ids) == 100
    assert all(isinstance(value, uuid.UUID) for value in ids)


def test_blob_with_wrong_hash_does_not_open() -> None:
    blob = seal_blob(StateKind.NVRAM, b"\xff" * 1000, FencingToken(epoch=1, generation=1))
    forged = blob.model_copy(
        update={
            "compressed": SecretBytes(
                seal_blob(StateKind.NVRAM, b"\x00" * 1000, blob.token).compressed.get_secret_value()
            )
        }
    )
    with pytest.raises(ValueError, match="does not match"):
        open_blob(forged)


def test_fencing_token_order() -> None:
    older = FencingToken(epoch=2, generation=1_000)
    assert FencingToken(epoch=2, generation=1_001).is_newer_than(older)
    assert FencingToken(epoch=3, generation=0).is_newer_than(older)
    assert not FencingToken(epoch=1, generation=10**15).is_newer_than(older)
    assert not older.is_newer_than(older)
