"""The leak scanner itself must be able to fail: it finds every encoding it claims to."""

from __future__ import annotations

import base64
import os
import zlib

import pytest

from leak_scan import content_fingerprints, find_leaks, leak_forms

SECRET = os.urandom(32)
STATE = os.urandom(6000)


@pytest.mark.parametrize(
    "leaked",
    [
        SECRET,
        SECRET.hex().encode(),
        SECRET.hex().upper().encode(),
        base64.b64encode(SECRET),
        base64.urlsafe_b64encode(SECRET),
    ],
)
def test_every_form_of_the_secret_is_found(leaked: bytes) -> None:
    line = b'{"event": "oops", "value": "' + leaked + b'"}\n'
    assert find_leaks([("log", line)], leak_forms(SECRET)) == ["log"]


@pytest.mark.parametrize(
    "encode",
    [
        lambda data: data,
        lambda data: data.hex().encode(),
        lambda data: base64.b64encode(data),
        lambda data: base64.b64encode(zlib.compress(data, 6)),
    ],
)
def test_state_bytes_are_found_in_any_encoding(encode: object) -> None:
    leaked = encode(STATE)  # type: ignore[operator]
    assert find_leaks([("log", b"prefix " + leaked)], content_fingerprints(STATE)) == ["log"]


def test_clean_text_has_no_hits() -> None:
    clean = (
        b'{"event": "state persisted", "content_hash": "' + os.urandom(32).hex().encode() + b'"}'
    )
    assert find_leaks([("log", clean)], leak_forms(SECRET) + content_fingerprints(STATE)) == []
