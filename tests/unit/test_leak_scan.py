"""The leak scanner itself must be able to fail: it finds every encoding it claims to."""

from __future__ import annotations

import base64
import os
import zlib
from pathlib import Path

import pytest

from leak_scan import content_fingerprints, find_leaks, leak_forms, read_files

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


def test_files_under_a_directory_are_read_and_a_planted_hit_found(tmp_path: Path) -> None:
    (tmp_path / "logs" / "deep").mkdir(parents=True)
    (tmp_path / "logs" / "clean.log").write_bytes(b"nothing here\n")
    planted = tmp_path / "logs" / "deep" / "planted.log"
    planted.write_bytes(b"x=" + base64.b64encode(SECRET) + b"\n")
    scanned = list(read_files([tmp_path / "logs", tmp_path / "absent.log"]))
    assert len(scanned) == 2
    assert find_leaks(scanned, leak_forms(SECRET)) == [str(planted)]
