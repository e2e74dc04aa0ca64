"""Bounded compression of state blobs: zstd written, zstd and zlib read."""

from __future__ import annotations

import base64
import os
import struct
import tracemalloc
import zlib
from collections.abc import Callable

import pytest
import zstandard

from keeper_shared.state_format.blobs import MAX_CANONICAL_SIZE
from keeper_shared.state_format.compression import (
    MAX_WINDOW_SIZE,
    ZSTD_MAGIC,
    BlobFormatError,
    CorruptBlobError,
    DecompressionBombError,
    compress,
    decompress_bounded,
)

OVMF_VARS_SIZE = 540_672
CANARY = b"CANARY-NVRAM-SECRET-3b9e"
SKIPPABLE_FRAME = b"\x50\x2a\x4d\x18" + struct.pack("<I", len(CANARY)) + CANARY
"""A zstd skippable frame (magic 0x184D2A50, length, payload) holding the canary."""


def _nvram_like(random_bytes: int, size: int = OVMF_VARS_SIZE) -> bytes:
    """An OVMF VARS image: erased flash (0xFF) with a few KB of variable data in it."""
    image = bytearray(b"\xff" * size)
    image[0x2000 : 0x2000 + random_bytes] = os.urandom(random_bytes)
    return bytes(image)


def _zlib(data: bytes) -> bytes:
    """A zlib stream as blobs were compressed before zstd (level 6)."""
    return zlib.compress(data, 6)


def _zlib_small_window(data: bytes) -> bytes:
    compressor = zlib.compressobj(6, zlib.DEFLATED, 10)
    stream = compressor.compress(data) + compressor.flush()
    assert stream[0] == ZSTD_MAGIC[0]
    return stream


ENCODINGS = pytest.mark.parametrize("encode", [compress, _zlib], ids=["zstd", "zlib"])
"""What is written now, and what older versions stored and exported: both must be read."""


def _assert_no_canary(text: str) -> None:
    for form in (CANARY, CANARY.hex().encode(), base64.b64encode(CANARY)):
        assert form.decode() not in text


def _with_declared_size(frame: bytes, size: int) -> bytes:
    """``frame`` with the content size in its header replaced by ``size``.

    Only for a header of the shape ZstdCompressor writes for content larger than its window
    (over 64 KiB): frame header descriptor 0x80 (a 4-byte content size, no single-segment
    flag, no dictionary, no checksum), then the window byte, then the size at offset 6.
    """
    assert frame[4] == 0x80, "not the header shape this helper patches"
    return frame[:6] + struct.pack("<I", size) + frame[10:]


def _declaring_no_content(frame: bytes) -> bytes:
    """A small ``frame`` whose header says it holds 0 bytes: descriptor 0x20 (single segment,
    1-byte content size at offset 5), as ZstdCompressor writes for up to 255 bytes."""
    assert frame[4] == 0x20, "not the header shape this helper patches"
    return frame[:5] + b"\x00" + frame[6:]


def _peak_memory_of(call: Callable[[], object]) -> int:
    """Peak Python memory while ``call`` runs (it is expected to raise BlobFormatError)."""
    tracemalloc.start()
    try:
        with pytest.raises(BlobFormatError):
            call()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak


# ------------------------------------------------------------------------ what is written


def test_compress_writes_one_zstd_frame_with_its_size_and_no_checksum() -> None:
    data = _nvram_like(4096)
    frame = compress(data)
    assert frame.startswith(ZSTD_MAGIC)
    parameters = zstandard.get_frame_parameters(frame)
    assert parameters.content_size == len(data)
    # Readers check the sha256 of the content, so the frame carries no checksum of its own.
    assert not parameters.has_checksum


@ENCODINGS
def test_round_trip(encode: Callable[[bytes], bytes]) -> None:
    data = _nvram_like(4096)
    assert decompress_bounded(encode(data), len(data)) == data


@ENCODINGS
def test_empty_round_trip(encode: Callable[[bytes], bytes]) -> None:
    assert decompress_bounded(encode(b""), 0) == b""


def test_random_content_round_trips() -> None:
    data = os.urandom(16 * 1024)
    assert decompress_bounded(compress(data), len(data)) == data


def test_largest_accepted_content_round_trips_under_the_window_cap() -> None:
    # An 8 MiB NVRAM (the largest accepted) must decode with the decoder's window capped.
    size = max(MAX_CANONICAL_SIZE.values())
    assert size <= MAX_WINDOW_SIZE
    data = _nvram_like(64 * 1024, size)
    assert decompress_bounded(compress(data), size) == data


@pytest.mark.parametrize(
    "stream",
    [
        zlib.compress(CANARY * 50, 1),
        zlib.compress(CANARY * 50, 9),
        # A 1 KiB window gives the header byte 0x28, the first byte of zstd's magic too.
        _zlib_small_window(CANARY * 50),
    ],
    ids=["level 1", "level 9", "1 KiB window"],
)
def test_zlib_streams_of_any_level_and_window_are_read(stream: bytes) -> None:
    assert decompress_bounded(stream, len(CANARY) * 50) == CANARY * 50


@pytest.mark.parametrize("random_bytes", [2048, 4096])
def test_nvram_image_compresses_to_a_few_kilobytes(random_bytes: int) -> None:
    # Random bytes do not compress, so the figure is that payload plus a small overhead.
    compressed = compress(_nvram_like(random_bytes))
    assert len(compressed) < random_bytes + 1536


# ------------------------------------------------------------------------ limits and bombs


@ENCODINGS
def test_output_exactly_at_limit_is_accepted(encode: Callable[[bytes], bytes]) -> None:
    data = b"\xff" * 1000
    assert decompress_bounded(encode(data), 1000) == data


@ENCODINGS
def test_output_one_byte_over_limit_is_a_bomb(encode: Callable[[bytes], bytes]) -> None:
    with pytest.raises(DecompressionBombError, match="more than the 999 bytes"):
        decompress_bounded(encode(b"\xff" * 1000), 999)


def _zlib_zero_bomb(mebibytes: int) -> bytes:
    compressor = zlib.compressobj(9)
    chunk = bytes(1024 * 1024)
    parts = [compressor.compress(chunk) for _ in range(mebibytes)]
    parts.append(compressor.flush())
    return b"".join(parts)


def _zstd_streamed_zero_bomb(mebibytes: int) -> bytes:
    """Zeros compressed as a stream, so the header states no content size at all."""
    compressor = zstandard.ZstdCompressor(level=19).compressobj()
    chunk = bytes(1024 * 1024)
    parts = [compressor.compress(chunk) for _ in range(mebibytes)]
    parts.append(compressor.flush())
    return b"".join(parts)


def test_zstd_bomb_headers_are_what_the_tests_below_assume() -> None:
    declared = zstandard.get_frame_parameters(compress(bytes(64 * 1024 * 1024)))
    assert declared.content_size == 64 * 1024 * 1024
    streamed = zstandard.get_frame_parameters(_zstd_streamed_zero_bomb(64))
    assert streamed.content_size == zstandard.CONTENTSIZE_UNKNOWN


@pytest.mark.parametrize(
    "bomb",
    [
        pytest.param(lambda: _zlib_zero_bomb(256), id="zlib, 256 MiB"),
        pytest.param(lambda: compress(bytes(64 * 1024 * 1024)), id="zstd, 64 MiB, size declared"),
        pytest.param(lambda: _zstd_streamed_zero_bomb(64), id="zstd, 64 MiB, size not declared"),
    ],
)
def test_bomb_is_refused_without_inflating_it(bomb: Callable[[], bytes]) -> None:
    blob = bomb()
    assert len(blob) < 300 * 1024
    limit = 1024 * 1024
    tracemalloc.start()
    try:
        with pytest.raises(DecompressionBombError):
            decompress_bounded(blob, limit)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Inflating it all would be the attack; the output buffer stays near the limit.
    assert peak < 3 * limit


def test_frame_declaring_a_small_size_but_holding_a_bomb_is_refused_within_the_limit() -> None:
    lying = _with_declared_size(compress(bytes(64 * 1024 * 1024)), 1000)
    limit = 1024 * 1024
    assert _peak_memory_of(lambda: decompress_bounded(lying, limit)) < 3 * limit


@pytest.mark.parametrize("declared", [1000, 8 * 1024 * 1024], ids=["less", "more"])
def test_frame_whose_declared_size_is_not_its_content_is_corrupt(declared: int) -> None:
    # Within the limit either way: only the frame's own consistency can refuse it.
    lying = _with_declared_size(compress(_nvram_like(4096, 4 * 1024 * 1024)), declared)
    with pytest.raises(CorruptBlobError):
        decompress_bounded(lying, 8 * 1024 * 1024)


def test_frame_asking_for_a_window_over_the_cap_is_refused() -> None:
    # Streamed (no content size), so the decoder would have to allocate the whole window.
    parameters = zstandard.ZstdCompressionParameters(window_log=24, compression_level=3)
    compressor = zstandard.ZstdCompressor(compression_params=parameters).compressobj()
    frame = compressor.compress(CANARY) + compressor.flush()
    assert zstandard.get_frame_parameters(frame).window_size > MAX_WINDOW_SIZE
    with pytest.raises(CorruptBlobError, match="too much memory") as caught:
        decompress_bounded(frame, 1024 * 1024)
    _assert_no_canary(str(caught.value))


# ------------------------------------------------------------------------ malformed input


def test_errors_are_blob_format_errors_and_value_errors() -> None:
    assert issubclass(DecompressionBombError, BlobFormatError)
    assert issubclass(CorruptBlobError, BlobFormatError)
    assert issubclass(BlobFormatError, ValueError)


@pytest.mark.parametrize(
    ("name", "blob"),
    [
        ("empty", b""),
        ("one byte", b"\x78"),
        ("neither format", b"this is not a compressed stream at all"),
        ("raw canary", CANARY * 10),
        ("gzip", b"\x1f\x8b\x08\x00" + bytes(20)),
        ("zstd magic only", ZSTD_MAGIC),
        ("zstd header only", compress(CANARY * 100)[:6]),
        ("zstd truncated", compress(CANARY * 100)[:-7]),
        ("zstd trailing garbage", compress(CANARY) + CANARY),
        ("zstd trailing byte", compress(CANARY) + b"\x00"),
        ("zstd two frames", compress(CANARY) + compress(CANARY)),
        ("zstd empty frame then a frame", compress(b"") + compress(CANARY)),
        ("zstd skippable frame after", compress(CANARY) + SKIPPABLE_FRAME),
        ("zstd skippable frame alone", SKIPPABLE_FRAME),
        ("zstd then zlib", compress(CANARY) + _zlib(CANARY)),
        # zstandard's one-shot decompress() returns b"" for this without reading further.
        ("zstd declaring 0 bytes", _declaring_no_content(compress(CANARY * 4))),
        ("zstd corrupt block", compress(CANARY * 100)[:8] + bytes(20) + CANARY),
        ("zlib truncated", _zlib(CANARY * 100)[:-7]),
        ("zlib trailing garbage", _zlib(CANARY) + CANARY),
        ("zlib two streams", _zlib(CANARY) + _zlib(CANARY)),
        ("zlib then zstd", _zlib(CANARY) + compress(CANARY)),
        ("zlib flipped checksum", _zlib(CANARY)[:-1] + bytes([_zlib(CANARY)[-1] ^ 1])),
        ("zlib header, deflate64 method", b"\x79\x9c" + _zlib(CANARY)[2:]),
    ],
    ids=lambda value: value if isinstance(value, str) else "",
)
def test_corrupt_blobs_are_refused_without_leaking_data(name: str, blob: bytes) -> None:
    with pytest.raises(CorruptBlobError) as caught:
        decompress_bounded(blob, 1024 * 1024)
    _assert_no_canary(str(caught.value))
    # A chained library error would put a second message in every traceback; none is kept.
    assert caught.value.__cause__ is None
    assert caught.value.__context__ is None or caught.value.__suppress_context__


def test_negative_limit_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="must not be negative"):
        decompress_bounded(compress(b"x"), -1)


def _resident_bytes() -> int:
    with open("/proc/self/statm", encoding="ascii") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_kept_frames_do_not_pin_their_worst_case_buffers() -> None:
    # A host agent keeps one compressed NVRAM per VM. Each frame used to sit in a buffer
    # allocated for the whole input: 200 kept frames of ~9 KB then held ~100 MB.
    image = bytearray(540_672)
    for offset in range(0, len(image), 4096):
        image[offset : offset + 64] = os.urandom(64)
    before = _resident_bytes()

    kept = [compress(bytes(image)) for _ in range(200)]

    grown = _resident_bytes() - before
    assert sum(map(len, kept)) < 4 * 1024 * 1024
    assert grown < 40 * 1024 * 1024, f"RSS grew by {grown / 2**20:.0f} MiB"
