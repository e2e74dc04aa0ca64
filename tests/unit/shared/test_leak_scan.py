"""The leak scanner itself must be able to fail: it finds every encoding it claims to."""

from __future__ import annotations

import base64
import os
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest

from keeper_shared.state_format.compression import compress
from support.leak_scan import content_fingerprints, find_leaks, leak_forms, read_files

SECRET = os.urandom(32)
STATE = os.urandom(6000)
NVRAM = b"\xff" * 4000 + os.urandom(2000)
"""Erased flash then variable data: it compresses, so its compressed forms share no chunk
with it (random STATE does not compress: its zstd frame holds it verbatim)."""


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


@pytest.mark.parametrize(
    "encode",
    [compress, lambda data: zlib.compress(data, 6)],
    ids=["zstd, as it travels now", "zlib, as older versions stored it"],
)
def test_compressed_state_is_found_as_it_travels(encode: Callable[[bytes], bytes]) -> None:
    leaked = base64.b64encode(encode(NVRAM))
    assert find_leaks([("log", b"prefix " + leaked)], content_fingerprints(NVRAM)) == ["log"]


def test_clean_text_has_no_hits() -> None:
    clean = (
        b'{"event": "state persisted", "content_hash": "' + os.urandom(32).hex().encode() + b'"}'
    )
    assert find_leaks([("log", clean)], leak_forms(SECRET) + content_fingerprints(STATE)) == []


def test_files_under_a_directory_are_read_and_a_planted_hit_found(tmp_path: Path) -> None:
    (tmp_path / "logs" / "deep").mkdir(parents=True)
    (tmp_path / "logs" / "clean.log").write_bytes(b"nothing here\n")
    planted = tmp_path / "logs" / "deep" / "planted.log"
    planted.write_bytes(b"x=" + base64.b64encode(SECRET) + b"\n")
    scanned = list(read_files([tmp_path / "logs", tmp_path / "absent.log"]))
    assert len(scanned) == 2
    assert find_leaks(scanned, leak_forms(SECRET)) == [str(planted)]
