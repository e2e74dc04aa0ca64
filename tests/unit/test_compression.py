"""Bounded zlib compression of state blobs."""

from __future__ import annotations

import base64
import os
import tracemalloc
import zlib

import pytest

from keeper_shared.compression import (
    BlobFormatError,
    CorruptBlobError,
    DecompressionBombError,
    compress,
    decompress_bounded,
)

OVMF_VARS_SIZE = 540_672
CANARY = b"CANARY-NVRAM-SECRET-3b9e"


def _nvram_like(random_bytes: int) -> bytes:
    """An OVMF VARS image: erased flash (0xFF) with a few KB of variable data in it."""
    image = bytearray(b"\xff" * OVMF_VARS_SIZE)
    image[0x2000 : 0x2000 + random_bytes] = os.urandom(random_bytes)
    return bytes(image)


def _assert_no_canary(text: str) -> None:
    for form in (CANARY, CANARY.hex().encode(), base64.b64encode(CANARY)):
        assert form.decode() not in text


def test_round_trip() -> None:
    data = _nvram_like(4096)
    assert decompress_bounded(compress(data), len(data)) == data


def test_empty_round_trip() -> None:
    assert decompress_bounded(compress(b""), 0) == b""


@pytest.mark.parametrize("random_bytes", [2048, 4096])
def test_nvram_image_compresses_to_a_few_kilobytes(random_bytes: int) -> None:
    # Random bytes do not compress, so the figure is that payload plus a small overhead.
    compressed = compress(_nvram_like(random_bytes))
    assert len(compressed) < random_bytes + 1536


def test_output_exactly_at_limit_is_accepted() -> None:
    data = b"\xff" * 1000
    assert decompress_bounded(compress(data), 1000) == data


def test_output_one_byte_over_limit_is_a_bomb() -> None:
    with pytest.raises(DecompressionBombError, match="more than the 999 bytes"):
        decompress_bounded(compress(b"\xff" * 1000), 999)


def _zero_bomb(mebibytes: int) -> bytes:
    compressor = zlib.compressobj(9)
    chunk = bytes(1024 * 1024)
    parts = [compressor.compress(chunk) for _ in range(mebibytes)]
    parts.append(compressor.flush())
    return b"".join(parts)


def test_bomb_is_refused_without_inflating_it() -> None:
    bomb = _zero_bomb(256)
    assert len(bomb) < 300 * 1024
    limit = 4 * 1024 * 1024
    tracemalloc.start()
    try:
        with pytest.raises(DecompressionBombError):
            decompress_bounded(bomb, limit)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Inflating the 256 MiB would be the attack; the output buffer stays near the limit.
    assert peak < 3 * limit


def test_errors_are_blob_format_errors_and_value_errors() -> None:
    assert issubclass(DecompressionBombError, BlobFormatError)
    assert issubclass(CorruptBlobError, BlobFormatError)
    assert issubclass(BlobFormatError, ValueError)


@pytest.mark.parametrize(
    ("name", "blob"),
    [
        ("empty", b""),
        ("not zlib", b"this is not a zlib stream at all"),
        ("raw canary", CANARY * 10),
        ("truncated", compress(CANARY * 100)[:-7]),
        ("trailing garbage", compress(CANARY) + CANARY),
        ("two streams", compress(CANARY) + compress(CANARY)),
        ("flipped checksum", compress(CANARY)[:-1] + bytes([compress(CANARY)[-1] ^ 1])),
        ("gzip, not zlib", b"\x1f\x8b\x08\x00" + bytes(20)),
    ],
    ids=lambda value: value if isinstance(value, str) else "",
)
def test_corrupt_blobs_are_refused_without_leaking_data(name: str, blob: bytes) -> None:
    with pytest.raises(CorruptBlobError) as caught:
        decompress_bounded(blob, 1024 * 1024)
    _assert_no_canary(str(caught.value))
    # A chained zlib.error would put a second message in every traceback; none is kept.
    assert caught.value.__cause__ is None
    assert caught.value.__context__ is None or caught.value.__suppress_context__


def test_negative_limit_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="must not be negative"):
        decompress_bounded(compress(b"x"), -1)
