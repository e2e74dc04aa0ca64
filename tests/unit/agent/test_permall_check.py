"""What swtpm could not load is recognised before a host writes it: a permall that is empty,
cut short, not in swtpm's framing, not libtpms' state, or larger than libtpms writes."""

from __future__ import annotations

import pytest

from keeper_devtools.swtpm_lab import permall_framing
from keeper_host_agent.files.permall_check import (
    MAX_PERMALL_SIZE,
    SWTPM_HEADER,
    TLV_HEADER,
    ImplausiblePermallError,
    check_permall,
)

STATE = bytes(range(256)) * 20
GOOD = permall_framing(STATE)

# The first 24 bytes of a permall swtpm 0.7.1 / libtpms 0.9 manufactured (swtpm_setup
# --tpm2, no certificates): swtpm's header (version 2, min_version 1, header size 10,
# flags 0, total 0x523), the TAG_DATA record (tag 1, length 0x513), then libtpms'
# header (version 3, magic 0xab364723, min_version 3).
REAL_START = bytes.fromhex("02 01 000a 0000 00000523  0001 00000513  0003 ab364723 0003")


def swtpm_framed(record: bytes, *, version: int = 2, flags: int = 0) -> bytes:
    total = SWTPM_HEADER.size + len(record)
    return SWTPM_HEADER.pack(version, 1, SWTPM_HEADER.size, flags, total) + record


def test_the_framing_matches_what_swtpm_and_libtpms_write() -> None:
    framed = permall_framing(b"")
    assert framed[:2] == REAL_START[:2]  # header version 2, min_version 1
    assert framed[2:4] == REAL_START[2:4]  # header size 10
    assert framed[10:12] == REAL_START[10:12]  # TAG_DATA
    assert framed[18:22] == REAL_START[18:22]  # libtpms' PERSISTENT_ALL magic


@pytest.mark.parametrize(
    "permall",
    [
        GOOD,
        permall_framing(b""),
        # Header version 1: libtpms' state right after swtpm's header, no records.
        swtpm_framed(GOOD[16:], version=1),
        # Encrypted with the state key (flag 0x01): opaque here, swtpm with the key judges.
        swtpm_framed(TLV_HEADER.pack(2, 64) + bytes(64), flags=0x01),
        # Encrypted records without the flag: still not this check's to judge.
        swtpm_framed(TLV_HEADER.pack(6, 80) + bytes(80)),
        # Another record before the state.
        swtpm_framed(TLV_HEADER.pack(3, 32) + bytes(32) + GOOD[10:]),
        # A later swtpm header version: its body's layout is unknown here.
        swtpm_framed(b"whatever comes", version=3),
    ],
    ids=["plain", "tiny", "header-v1", "encrypted", "encrypted-records", "hmac-first", "v3"],
)
def test_what_swtpm_loads_passes(permall: bytes) -> None:
    check_permall(permall)


@pytest.mark.parametrize(
    ("permall", "reason"),
    [
        (b"", "is empty (0 bytes)"),
        (GOOD[:9], "9 bytes, shorter than swtpm's 10-byte state header: truncated"),
        (GOOD[:-1], f"is {len(GOOD) - 1} bytes but its swtpm header says {len(GOOD)}: truncated"),
        (GOOD + b"\0", "bytes were added after it"),
        (bytes(4096), "does not start with swtpm's state header (header size 0, not 10)"),
        (swtpm_framed(TLV_HEADER.pack(1, 500) + bytes(20)), "declares 500 bytes but only 20"),
        (swtpm_framed(b"\x00\x01\x00"), "ends inside a record header"),
        (swtpm_framed(TLV_HEADER.pack(3, 4) + bytes(4)), "holds no TPM state record"),
        (swtpm_framed(TLV_HEADER.pack(1, 3) + b"abc"), "too few for libtpms' header"),
        (
            swtpm_framed(TLV_HEADER.pack(1, 40) + bytes(40)),
            "does not start with libtpms' permanent-state magic 0xab364723 (found 0x00000000)",
        ),
        (
            swtpm_framed(TLV_HEADER.pack(1, len(STATE) + 6) + GOOD[16:22] + STATE),
            "does not end with libtpms' permanent-state magic: truncated",
        ),
        (permall_framing(bytes(MAX_PERMALL_SIZE)), "more than the 262144"),
    ],
    ids=[
        "empty",
        "below-the-header",
        "truncated",
        "extended",
        "zeros",
        "record-cut",
        "record-header-cut",
        "no-state-record",
        "state-below-libtpms-header",
        "bad-magic",
        "no-closing-magic",
        "too-large",
    ],
)
def test_what_swtpm_could_not_load_is_refused_with_the_reason(permall: bytes, reason: str) -> None:
    with pytest.raises(ImplausiblePermallError) as caught:
        check_permall(permall)
    assert reason in str(caught.value)
    assert str(caught.value).startswith("tpm2-00.permall")


def test_the_size_bound_is_a_parameter() -> None:
    check_permall(GOOD, max_size=len(GOOD))
    with pytest.raises(ImplausiblePermallError, match="more than the 100"):
        check_permall(GOOD, max_size=100)
