"""Compression of state blobs, with every decompression bounded.

Blobs travel and rest as one zstd frame: zlib at level 6 took about 1.2 ms to compress and
1.4 ms to inflate a 540 KB OVMF NVRAM, zstd level 3 a tenth of that or less. Versions
already stored in Redis and bundles already exported hold zlib streams, so
`decompress_bounded` reads both, told apart by their first bytes, and refuses anything else.

A compressed blob arrives from the network, so it is untrusted: `decompress_bounded` stops
one byte past the caller's limit and so refuses a decompression bomb without ever
allocating it. Error messages never contain any of the data (invariant 4): they state sizes
and the libraries' own fixed diagnostics only.
"""

from __future__ import annotations

import zlib

import zstandard

COMPRESSION_LEVEL = 3
"""zstd's default trade-off; higher levels gain almost nothing on TPM/NVRAM state."""

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
"""The first four bytes of every zstd frame (RFC 8878)."""

MAX_WINDOW_SIZE = 8 * 1024 * 1024
"""Largest zstd window the decoder accepts. No honest frame needs a window larger than its
content, and no content accepted is larger than 8 MiB (blobs.MAX_CANONICAL_SIZE); without
this cap a crafted frame header alone could make the decoder allocate 128 MiB."""


class BlobFormatError(ValueError):
    """A blob (compressed stream or archive) is malformed or unsafe to use."""


class DecompressionBombError(BlobFormatError):
    """A compressed blob inflates beyond the size its caller allows."""


class CorruptBlobError(BlobFormatError):
    """A compressed blob is not exactly one complete, valid zstd frame or zlib stream."""


def compress(data: bytes) -> bytes:
    """Return ``data`` as one zstd frame with its content size in the header."""
    # No xxhash checksum in the frame: every reader checks the sha256 of the content
    # anyway (blobs.open_blob, the scrubber), so a checksum would cost time and 4 bytes and
    # catch nothing more. A new compressor per call: instances are not thread-safe (seal_blob
    # runs in worker threads) and one keeps megabytes of tables after use.
    compressor = zstandard.ZstdCompressor(
        level=COMPRESSION_LEVEL, write_checksum=False, write_content_size=True
    )
    frame = compressor.compress(data)
    # The frame comes in a buffer allocated for the worst case (the input's size) and shrunk
    # in place; the heap cannot reuse the hole behind it for the next such buffer. A host
    # agent keeps a frame per VM, so each pinned ~540 KB: 600 MB of RSS for 1,000 NVRAMs.
    # A copy of the right size frees the big buffer (bench: idle agent RSS).
    return bytes(memoryview(frame))


def decompress_bounded(data: bytes, max_size: int) -> bytes:
    """Decompress one zstd frame or zlib stream, refusing output larger than ``max_size``.

    At most ``max_size + 1`` bytes are ever produced, so a bomb costs no more memory than an
    honest blob of the largest allowed size. The frame or stream must be complete and end
    exactly where ``data`` ends: truncation and trailing bytes (a second frame included)
    are both refused, because either means the blob is not what was hashed and sent.

    Raises `DecompressionBombError` when the output would exceed ``max_size`` and
    `CorruptBlobError` for anything that is not exactly one valid zstd frame or zlib stream.
    """
    if max_size < 0:
        raise ValueError(f"max_size must not be negative, got {max_size}")
    if data.startswith(ZSTD_MAGIC):
        return _decompress_zstd(data, max_size)
    if _is_zlib_header(data):
        return _inflate_zlib(data, max_size)
    raise CorruptBlobError(
        f"compressed blob of {len(data)} bytes is neither a zstd frame nor a zlib stream"
    )


def _is_zlib_header(data: bytes) -> bool:
    """Whether ``data`` starts with a zlib header (RFC 1950): deflate (CM 8), a window of at
    most 32 KiB (CINFO 7), and CMF*256 + FLG a multiple of 31. No zstd frame passes this:
    its magic's first two bytes give 10421, which 31 does not divide."""
    if len(data) < 2:
        return False
    cmf, flg = data[0], data[1]
    return cmf & 0x0F == 8 and cmf >> 4 <= 7 and (cmf * 256 + flg) % 31 == 0


def _bomb(data: bytes, max_size: int) -> DecompressionBombError:
    return DecompressionBombError(
        f"compressed blob of {len(data)} bytes inflates to more than the {max_size} bytes allowed"
    )


def _decompress_zstd(data: bytes, max_size: int) -> bytes:
    # A new decompressor per call, as in `compress`: not thread-safe, and it keeps its window.
    decompressor = zstandard.ZstdDecompressor(max_window_size=MAX_WINDOW_SIZE)
    try:
        declared = zstandard.frame_content_size(data)
        if declared > max_size:
            raise _bomb(data, max_size)
        if declared > 0:
            # Every frame this project writes declares its size (`compress`). One call
            # decodes it into a buffer of exactly that size, which the check above bounds: a
            # frame holding more than it declares overflows that buffer and is refused, one
            # holding less is refused as corrupt, and so is anything after the frame. A
            # tenth of the two passes below, which cost more than the sha256 of the content
            # they check.
            return decompressor.decompress(data, allow_extra_data=False)
    except zstandard.ZstdError as exc:
        raise CorruptBlobError(f"compressed blob is corrupt (zstd: {exc})") from None
    return _decompress_zstd_undeclared(decompressor, data, max_size)


def _decompress_zstd_undeclared(
    decompressor: zstandard.ZstdDecompressor, data: bytes, max_size: int
) -> bytes:
    # A frame without a declared size, or declaring 0 (`ZstdDecompressor.decompress` returns
    # b"" unread for one that claims 0 bytes, whatever it holds). python-zstandard has no
    # call that both limits such a frame's output and tells where it ended, hence two passes
    # over the same frame:
    # 1. `stream_reader().read(n)` returns at most n bytes whatever the frame says, which
    #    proves the first frame (the only one `decompressobj` below decodes) inflates to at
    #    most ``max_size`` bytes;
    # 2. `decompressobj()` then decodes it knowing that, and reports whether the frame
    #    ended (`eof`) and what came after it (`unused_data`).
    try:
        with decompressor.stream_reader(data, read_across_frames=False) as reader:
            bounded = reader.read(max_size + 1)
        if len(bounded) > max_size:
            raise _bomb(data, max_size)
        del bounded  # so the second pass's output is the only copy alive
        frame = decompressor.decompressobj(read_across_frames=False)
        output = frame.decompress(data)
    except zstandard.ZstdError as exc:
        # The library's messages are fixed diagnostics ("Unknown frame descriptor") with at
        # most sizes in them, never bytes of the frame, so they are safe to pass on.
        raise CorruptBlobError(f"compressed blob is corrupt (zstd: {exc})") from None
    if not frame.eof:
        raise CorruptBlobError(
            f"compressed blob of {len(data)} bytes is truncated: the zstd frame does not end"
        )
    if frame.unused_data:
        raise CorruptBlobError(
            f"compressed blob has {len(frame.unused_data)} unexpected bytes after the end "
            "of the zstd frame"
        )
    return output


def _inflate_zlib(data: bytes, max_size: int) -> bytes:
    inflater = zlib.decompressobj()
    try:
        output = inflater.decompress(data, max_size + 1)
    except zlib.error as exc:
        # zlib's messages are fixed strings from the library ("incorrect header check"),
        # never bytes of the stream, so they are safe to pass on.
        raise CorruptBlobError(f"compressed blob is corrupt (zlib: {exc})") from None
    if len(output) > max_size:
        raise _bomb(data, max_size)
    if not inflater.eof:
        raise CorruptBlobError(
            f"compressed blob of {len(data)} bytes is truncated: the zlib stream does not end"
        )
    if inflater.unused_data:
        raise CorruptBlobError(
            f"compressed blob has {len(inflater.unused_data)} unexpected bytes after the end "
            "of the zlib stream"
        )
    return output
