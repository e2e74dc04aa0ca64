"""Compression of state blobs, with every decompression bounded.

Blobs travel and rest zlib-compressed. A compressed blob arrives from the network, so it is
untrusted: `decompress_bounded` stops inflating one byte past the caller's limit and so
refuses a decompression bomb without ever allocating it. Error messages never contain any of
the data (invariant 4): they state sizes and zlib's own fixed diagnostics only.
"""

from __future__ import annotations

import zlib

COMPRESSION_LEVEL = 6
"""zlib's default trade-off; higher levels gain almost nothing on TPM/NVRAM state."""


class BlobFormatError(ValueError):
    """A blob (compressed stream or archive) is malformed or unsafe to use."""


class DecompressionBombError(BlobFormatError):
    """A compressed blob inflates beyond the size its caller allows."""


class CorruptBlobError(BlobFormatError):
    """A compressed blob is not a complete, valid zlib stream."""


def compress(data: bytes) -> bytes:
    """Return ``data`` as a zlib stream (with header and checksum)."""
    return zlib.compress(data, COMPRESSION_LEVEL)


def decompress_bounded(data: bytes, max_size: int) -> bytes:
    """Inflate a zlib stream, refusing output larger than ``max_size`` bytes.

    At most ``max_size + 1`` bytes are ever produced, so a bomb costs no more memory than an
    honest blob of the largest allowed size. The stream must be complete and end exactly
    where ``data`` ends: truncation and trailing bytes are both refused, because either
    means the blob is not what was hashed and sent.

    Raises `DecompressionBombError` when the output would exceed ``max_size`` and
    `CorruptBlobError` for anything that is not exactly one valid zlib stream.
    """
    if max_size < 0:
        raise ValueError(f"max_size must not be negative, got {max_size}")
    inflater = zlib.decompressobj()
    try:
        output = inflater.decompress(data, max_size + 1)
    except zlib.error as exc:
        # zlib's messages are fixed strings from the library ("incorrect header check"),
        # never bytes of the stream, so they are safe to pass on.
        raise CorruptBlobError(f"compressed blob is corrupt (zlib: {exc})") from None
    if len(output) > max_size:
        raise DecompressionBombError(
            f"compressed blob of {len(data)} bytes inflates to more than the "
            f"{max_size} bytes allowed"
        )
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
