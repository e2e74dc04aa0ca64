"""The metadata stored beside each kept version (everything but the bytes), packed small.

Every kept version has one field in its kind's meta hash. As JSON (about 240 bytes) that
field cost about 315 bytes of Redis memory per version, as much as a third of a compressed
NVRAM blob; packed it is about 75 bytes. Format 1, after its format byte:

- the sha256 of the canonical content, 32 raw bytes;
- size, epoch, generation, and the store time in microseconds since the Unix epoch (UTC),
  each an unsigned LEB128 varint;
- the origin, one byte (see `_ORIGIN_CODES`);
- host, source VM id and swtpm version, each a varint length and UTF-8 bytes; for the two
  optional ones the length is stored plus one, and 0 means absent.

Format 2 appends a TPM version's libtpms profile (its name, a varint length and UTF-8
bytes) and StateFormatLevel (a varint). It is written only when the profile is known, so
NVRAM versions, clones and imports keep format 1, which a store of the release before reads.

Records written as JSON objects by earlier releases stay readable: a JSON object starts
with ``{``, never with the format byte.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Final

from keeper_shared.messages.state import VersionOrigin
from keeper_shared.messages.types import FencingToken

_FORMAT_V1: Final = 1
_FORMAT_V2: Final = 2
_HASH_SIZE: Final = 32
_UNIX_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_ORIGIN_CODES: Final = {VersionOrigin.HOST: 0, VersionOrigin.CLONE: 1, VersionOrigin.IMPORT: 2}
_ORIGINS_BY_CODE: Final = {code: origin for origin, code in _ORIGIN_CODES.items()}


class VersionMetaError(ValueError):
    """A stored metadata record is malformed (it never holds state bytes, so the message may
    describe what is wrong)."""


@dataclass(frozen=True)
class VersionMeta:
    """What the store records about one version besides its sealed bytes."""

    content_hash: str
    """sha256 of the uncompressed canonical content, lowercase hex."""
    size: int
    """Uncompressed size in bytes."""
    token: FencingToken
    host: str
    """'' for clones and imports, which no host wrote."""
    stored_at: datetime
    origin: VersionOrigin = VersionOrigin.HOST
    source_vm_id: str | None = None
    swtpm_version: str | None = None
    """swtpm on the host that read this state (None for old records, clones, imports)."""
    tpm_profile: str | None = None
    """The libtpms profile of a TPM version (None: NVRAM, unreadable, or an old record)."""
    state_format_level: int | None = None
    """The libtpms StateFormatLevel that profile needs; None exactly when the profile is."""


def pack_version_meta(meta: VersionMeta) -> bytes:
    """The record for the meta hash (format 2 when it has a profile, else 1)."""
    try:
        digest = bytes.fromhex(meta.content_hash)
    except ValueError:
        raise VersionMetaError("content hash is not hex") from None
    if len(digest) != _HASH_SIZE:
        raise VersionMetaError(f"content hash has {len(digest)} bytes, expected {_HASH_SIZE}")
    stored_at_us = (meta.stored_at - _UNIX_EPOCH) // timedelta(microseconds=1)
    with_profile = meta.tpm_profile is not None and meta.state_format_level is not None
    parts = [
        bytes([_FORMAT_V2 if with_profile else _FORMAT_V1]),
        digest,
        _varint(meta.size),
        _varint(meta.token.epoch),
        _varint(meta.token.generation),
        _varint(stored_at_us),
        bytes([_ORIGIN_CODES[meta.origin]]),
        _text(meta.host),
        _optional_text(meta.source_vm_id),
        _optional_text(meta.swtpm_version),
    ]
    if meta.tpm_profile is not None and meta.state_format_level is not None:
        parts += [_text(meta.tpm_profile), _varint(meta.state_format_level)]
    return b"".join(parts)


def unpack_version_meta(raw: bytes) -> VersionMeta:
    """Parse a meta-hash record, packed (format 1 or 2) or JSON (earlier releases)."""
    if raw[:1] == b"{":
        return _from_json(raw)
    if raw[:1] not in (bytes([_FORMAT_V1]), bytes([_FORMAT_V2])):
        raise VersionMetaError(f"version metadata has unknown format {raw[:1]!r}")
    reader = _Reader(raw, 1)
    digest = reader.take(_HASH_SIZE)
    size, epoch, generation, stored_at_us = (reader.varint() for _ in range(4))
    origin = _ORIGINS_BY_CODE.get(reader.take(1)[0])
    if origin is None:
        raise VersionMetaError("version metadata names an unknown origin")
    host = reader.text()
    source_vm_id = reader.optional_text()
    swtpm_version = reader.optional_text()
    profile, level = (reader.text(), reader.varint()) if raw[0] == _FORMAT_V2 else (None, None)
    reader.expect_end()
    return VersionMeta(
        content_hash=digest.hex(),
        size=size,
        token=FencingToken(epoch=epoch, generation=generation),
        host=host,
        stored_at=_UNIX_EPOCH + timedelta(microseconds=stored_at_us),
        origin=origin,
        source_vm_id=source_vm_id,
        swtpm_version=swtpm_version,
        tpm_profile=profile,
        state_format_level=level,
    )


def _from_json(raw: bytes) -> VersionMeta:
    try:
        meta = json.loads(raw)
        return VersionMeta(
            content_hash=meta["hash"],
            size=meta["size"],
            token=FencingToken(epoch=meta["epoch"], generation=meta["generation"]),
            host=meta["host"],
            stored_at=datetime.fromisoformat(meta["stored_at"]),
            origin=VersionOrigin(meta.get("origin", VersionOrigin.HOST.value)),
            source_vm_id=meta.get("source_vm_id"),
            swtpm_version=meta.get("swtpm_version"),
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise VersionMetaError(
            f"JSON version metadata is malformed ({type(exc).__name__})"
        ) from None


def _varint(value: int) -> bytes:
    if value < 0:
        raise VersionMetaError(f"cannot pack negative number {value}")
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        if not value:
            out.append(low)
            return bytes(out)
        out.append(low | 0x80)


def _text(value: str) -> bytes:
    encoded = value.encode("utf-8")
    return _varint(len(encoded)) + encoded


def _optional_text(value: str | None) -> bytes:
    if value is None:
        return _varint(0)
    encoded = value.encode("utf-8")
    return _varint(len(encoded) + 1) + encoded


class _Reader:
    """Reads a packed record front to back; every overrun is a `VersionMetaError`."""

    def __init__(self, raw: bytes, offset: int) -> None:
        self._raw = raw
        self._offset = offset

    def take(self, count: int) -> bytes:
        end = self._offset + count
        if end > len(self._raw):
            raise VersionMetaError("version metadata is truncated")
        chunk = self._raw[self._offset : end]
        self._offset = end
        return chunk

    def varint(self) -> int:
        value = shift = 0
        while True:
            byte = self.take(1)[0]
            value |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return value
            shift += 7
            if shift > 63:
                raise VersionMetaError("version metadata holds an oversized number")

    def text(self) -> str:
        return self._decode(self.take(self.varint()))

    def optional_text(self) -> str | None:
        length = self.varint()
        return None if length == 0 else self._decode(self.take(length - 1))

    def expect_end(self) -> None:
        if self._offset != len(self._raw):
            raise VersionMetaError("version metadata has trailing bytes")

    @staticmethod
    def _decode(chunk: bytes) -> str:
        try:
            return chunk.decode("utf-8")
        except UnicodeDecodeError:
            raise VersionMetaError("version metadata holds text that is not UTF-8") from None
