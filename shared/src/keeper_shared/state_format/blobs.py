"""Turning canonical state into a travelling :class:`StateBlob` and back, verified.

The hash always covers the uncompressed canonical content (invariant 6), so whoever opens a
blob checks that what it received is exactly what the host read as stable.
"""

from __future__ import annotations

import hashlib

from pydantic import SecretBytes

from keeper_shared.messages.types import FencingToken, StateBlob, StateKind
from keeper_shared.state_format.compression import BlobFormatError, compress, decompress_bounded
from keeper_shared.state_format.tpm_archive import DEFAULT_LIMITS

MAX_CANONICAL_SIZE = {
    StateKind.TPM: DEFAULT_LIMITS.max_archive_size(),
    StateKind.NVRAM: 8 * 1024 * 1024,
}
"""Largest uncompressed content accepted per kind (OVMF's 4M NVRAM is 4 MiB)."""


class BlobIntegrityError(BlobFormatError):
    """A blob's content does not match its declared size or hash."""


def content_hash(content: bytes) -> str:
    """sha256 of canonical content, as lowercase hex."""
    return hashlib.sha256(content).hexdigest()


def seal_blob(
    kind: StateKind,
    content: bytes,
    token: FencingToken,
    swtpm_version: str | None = None,
    *,
    digest: str | None = None,
) -> StateBlob:
    """Compress canonical content into a blob that carries its hash, token and the swtpm
    version of the host that read it. ``digest`` is ``content_hash(content)`` when the
    caller has just computed it (the host agent hashes each stable read once); a wrong one
    only makes a blob that every reader refuses."""
    return StateBlob(
        kind=kind,
        content_hash=digest if digest is not None else content_hash(content),
        size=len(content),
        token=token,
        compressed=SecretBytes(compress(content)),
        swtpm_version=swtpm_version,
    )


def open_blob(blob: StateBlob) -> bytes:
    """Decompress (bounded) and verify size and hash; raise BlobFormatError on any mismatch."""
    limit = MAX_CANONICAL_SIZE[blob.kind]
    if blob.size > limit:
        raise BlobIntegrityError(f"{blob.kind} blob declares {blob.size} bytes, limit {limit}")
    content = decompress_bounded(blob.compressed.get_secret_value(), blob.size)
    if len(content) != blob.size:
        raise BlobIntegrityError(
            f"{blob.kind} blob holds {len(content)} bytes, declared {blob.size}"
        )
    actual = content_hash(content)
    if actual != blob.content_hash:
        raise BlobIntegrityError(
            f"{blob.kind} blob hash {actual[:12]} does not match declared {blob.content_hash[:12]}"
        )
    return content
