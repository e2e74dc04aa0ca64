"""The packed per-version metadata: round trips, records of earlier releases, bad input."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime

import pytest

from keeper_shared.messages.state import VersionOrigin
from keeper_shared.messages.types import FencingToken
from keeper_state_store.storage.version_meta import (
    VersionMeta,
    VersionMetaError,
    pack_version_meta,
    unpack_version_meta,
)

HASH = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
STORED_AT = datetime(2026, 11, 28, 6, 30, 15, 123456, tzinfo=UTC)


def host_meta() -> VersionMeta:
    """A version a host wrote, as the store records it."""
    return VersionMeta(
        content_hash=HASH,
        size=540_672,
        token=FencingToken(epoch=3, generation=1_764_311_415_123_456),
        host="hypervisor-07.example.org",
        stored_at=STORED_AT,
        swtpm_version="0.8.0",
    )


def test_a_host_version_round_trips() -> None:
    meta = host_meta()
    assert unpack_version_meta(pack_version_meta(meta)) == meta


def test_a_clone_round_trips_with_its_source_and_no_host() -> None:
    meta = VersionMeta(
        content_hash=HASH,
        size=10_240,
        token=FencingToken(epoch=0, generation=0),
        host="",
        stored_at=STORED_AT,
        origin=VersionOrigin.CLONE,
        source_vm_id="3f2a6c1e-8d4b-4c1e-9a0b-5e6f7a8b9c0d",
    )
    assert unpack_version_meta(pack_version_meta(meta)) == meta


def test_the_largest_fencing_token_round_trips() -> None:
    meta = VersionMeta(
        content_hash=HASH,
        size=0,
        token=FencingToken(epoch=2**64 - 1, generation=2**64 - 1),
        host="h",
        stored_at=STORED_AT,
    )
    assert unpack_version_meta(pack_version_meta(meta)) == meta


def test_packed_is_at_most_two_fifths_of_the_json_it_replaces() -> None:
    meta = host_meta()
    legacy = json.dumps(
        {
            "hash": HASH,
            "size": meta.size,
            "epoch": meta.token.epoch,
            "generation": meta.token.generation,
            "host": meta.host,
            "stored_at": STORED_AT.isoformat(),
            "swtpm_version": meta.swtpm_version,
        }
    )
    assert len(pack_version_meta(meta)) * 5 <= len(legacy) * 2


def test_a_json_record_of_an_earlier_release_is_still_read() -> None:
    legacy = json.dumps(
        {
            "hash": HASH,
            "size": 2048,
            "epoch": 1,
            "generation": 5,
            "host": "host-a",
            "stored_at": STORED_AT.isoformat(),
            "origin": "import",
            "source_vm_id": "3f2a6c1e-8d4b-4c1e-9a0b-5e6f7a8b9c0d",
        }
    ).encode()
    meta = unpack_version_meta(legacy)
    assert meta.content_hash == HASH
    assert meta.token == FencingToken(epoch=1, generation=5)
    assert meta.origin is VersionOrigin.IMPORT
    assert meta.stored_at == STORED_AT
    assert meta.swtpm_version is None


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        (b"", "unknown format"),
        (b"\x07rest", "unknown format"),
        (b"{not json", "malformed"),
        (b'{"hash": "ab"}', "malformed"),
    ],
)
def test_unreadable_records_are_refused_with_a_clear_error(raw: bytes, problem: str) -> None:
    with pytest.raises(VersionMetaError, match=problem):
        unpack_version_meta(raw)


def test_a_truncated_or_extended_packed_record_is_refused() -> None:
    packed = pack_version_meta(host_meta())
    for cut in (1, 20, 40, len(packed) - 1):
        with pytest.raises(VersionMetaError, match="truncated"):
            unpack_version_meta(packed[:cut])
    with pytest.raises(VersionMetaError, match="trailing"):
        unpack_version_meta(packed + b"\x00")


def test_a_hash_that_is_not_sha256_hex_is_not_packed() -> None:
    with pytest.raises(VersionMetaError):
        pack_version_meta(VersionMeta(**{**host_meta().__dict__, "content_hash": "xyz"}))
    with pytest.raises(VersionMetaError):
        pack_version_meta(VersionMeta(**{**host_meta().__dict__, "content_hash": "ab" * 16}))


def test_a_tpm_version_round_trips_with_its_libtpms_profile_in_format_2() -> None:
    meta = replace(host_meta(), tpm_profile="default-v1", state_format_level=7)
    packed = pack_version_meta(meta)
    assert packed[0] == 2
    assert unpack_version_meta(packed) == meta


def test_a_version_without_a_profile_stays_format_1_which_the_release_before_reads() -> None:
    assert pack_version_meta(host_meta())[0] == 1
