"""The export bundle: one portable file holding a VM's TPM and NVRAM state and metadata.

Layout (all integers big-endian)::

    header (41 bytes)  magic "VTPMKEEP", format version, KDF id (1 = scrypt),
                       log2(n), r, p, 16-byte salt, 12-byte nonce
    ciphertext         AES-256-GCM(key = scrypt(passphrase, salt), nonce, plaintext,
                       associated data = the whole header), tag last

    plaintext          u32 manifest length, manifest (JSON), then each entry's compressed
                       canonical content, in manifest order

Format version 2 is version 1 plus the libvirt secret the TPM state is encrypted with (a
TPM with ``<encryption secret>``), in the manifest, so inside the ciphertext like the state:
without it the exported TPM state is useless. A bundle without a secret is still written as
version 1, which older builds read.

The header is the associated data, so flipping any byte of the file (or a wrong passphrase,
or truncation) fails authentication before anything is parsed. Content is verified after
decryption anyway (bounded decompression, size, hash, and for the TPM the archive rules),
because a bundle is only as trustworthy as whoever made it.

Pure: no I/O. Error messages name what is wrong, never the passphrase or any content bytes
(invariant 4), and are raised without exception chains.
"""

from __future__ import annotations

import secrets
import struct
import unicodedata
from dataclasses import dataclass
from datetime import datetime
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt
from pydantic import BaseModel, ConfigDict, Field, SecretBytes, ValidationError

from keeper_shared.messages.types import (
    MAX_COMPRESSED_BLOB_BYTES,
    ContentHash,
    FencingToken,
    StateBlob,
    StateKind,
    TpmSecret,
    VmId,
)
from keeper_shared.state_format.blobs import open_blob
from keeper_shared.state_format.compression import BlobFormatError
from keeper_shared.state_format.tpm_archive import unpack_tpm_state

MAGIC: Final = b"VTPMKEEP"
FORMAT_VERSION: Final = 1
FORMAT_VERSION_WITH_TPM_SECRET: Final = 2
KDF_SCRYPT: Final = 1
_HEADER = struct.Struct(">8sBBBBB16s12s")
HEADER_SIZE: Final = _HEADER.size
_TAG_SIZE: Final = 16
_LENGTH = struct.Struct(">I")
MAX_BUNDLE_BYTES: Final = MAX_COMPRESSED_BLOB_BYTES
"""A bundle travels in one message field as one blob does; real ones are a few KB."""
_MAX_MANIFEST_BYTES: Final = 64 * 1024
# scrypt costs 128 * r * n bytes of memory: a bundle from elsewhere must not make the reader
# allocate gigabytes, nor be weaker than what this module writes by default.
_MIN_LOG2_N: Final = 14
_MAX_SCRYPT_MEMORY: Final = 256 * 1024 * 1024
_MAX_SCRYPT_P: Final = 4


class BundleError(ValueError):
    """A bundle cannot be read or written. Safe to log: never holds secrets."""


class BundleFormatError(BundleError):
    """Not a bundle this build can read (magic, version, KDF parameters, size)."""


class BundleAuthenticationError(BundleError):
    """Wrong passphrase, or the bundle was modified or truncated."""


class BundleContentError(BundleError):
    """The bundle decrypted, but what it holds is malformed or does not verify."""


@dataclass(frozen=True)
class ScryptParams:
    """Cost parameters of the passphrase KDF."""

    log2_n: int = 15
    r: int = 8
    p: int = 1

    def check(self) -> None:
        """Refuse parameters weaker than the minimum or too costly to run."""
        if not _MIN_LOG2_N <= self.log2_n <= 24 or not 1 <= self.r <= 255:
            raise BundleFormatError(
                f"scrypt parameters log2(n)={self.log2_n}, r={self.r} are out of range"
            )
        if not 1 <= self.p <= _MAX_SCRYPT_P:
            raise BundleFormatError(f"scrypt parameter p={self.p} is out of range")
        if 128 * self.r * (1 << self.log2_n) > _MAX_SCRYPT_MEMORY:
            raise BundleFormatError(
                f"scrypt parameters log2(n)={self.log2_n}, r={self.r} need more than "
                f"{_MAX_SCRYPT_MEMORY // (1024 * 1024)} MiB"
            )


DEFAULT_SCRYPT: Final = ScryptParams()


@dataclass(frozen=True)
class BundleEntry:
    """One kind's state in a bundle, with where it came from."""

    blob: StateBlob
    """Compressed canonical content, its hash, size and the source's fencing token."""
    version: int
    """Its version number in the exporting store."""
    host: str
    """The host it was pulled from ('' when it was itself a clone or an import)."""
    stored_at: datetime
    """When the exporting store wrote it."""


@dataclass(frozen=True)
class Bundle:
    """A VM's exported state: at most one entry per kind."""

    vm_id: str
    """The VM it was exported from."""
    exported_at: datetime
    """When it was exported (UTC)."""
    entries: tuple[BundleEntry, ...]
    """TPM and/or NVRAM."""
    tpm_secret: TpmSecret | None = None
    """The libvirt secret the TPM state is encrypted with, None for a plain TPM state."""

    def entry(self, kind: StateKind) -> BundleEntry | None:
        """The entry of ``kind``, None when the bundle has none."""
        return next((entry for entry in self.entries if entry.blob.kind is kind), None)


class _ManifestEntry(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)

    kind: StateKind
    version: int = Field(ge=1)
    content_hash: ContentHash
    size: int = Field(ge=0)
    compressed_size: int = Field(ge=0, le=MAX_COMPRESSED_BLOB_BYTES)
    token: FencingToken
    host: str = Field(max_length=128)
    stored_at: datetime


class _Manifest(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)

    vm_id: VmId
    exported_at: datetime
    entries: list[_ManifestEntry] = Field(min_length=1, max_length=len(StateKind))
    tpm_secret: TpmSecret | None = None


def write_bundle(bundle: Bundle, passphrase: str, params: ScryptParams = DEFAULT_SCRYPT) -> bytes:
    """Verify ``bundle``'s content and encrypt it under ``passphrase`` into a bundle file."""
    params.check()
    _check_entries(bundle.entries)
    for entry in bundle.entries:
        _verify_content(entry.blob)
    manifest = _Manifest(
        vm_id=bundle.vm_id,
        exported_at=bundle.exported_at,
        entries=[
            _ManifestEntry(
                kind=entry.blob.kind,
                version=entry.version,
                content_hash=entry.blob.content_hash,
                size=entry.blob.size,
                compressed_size=len(entry.blob.compressed.get_secret_value()),
                token=entry.blob.token,
                host=entry.host,
                stored_at=entry.stored_at,
            )
            for entry in bundle.entries
        ],
        tpm_secret=bundle.tpm_secret,
    )
    manifest_json = manifest.model_dump_json(exclude_none=True).encode()
    plaintext = b"".join(
        [
            _LENGTH.pack(len(manifest_json)),
            manifest_json,
            *(entry.blob.compressed.get_secret_value() for entry in bundle.entries),
        ]
    )
    salt = secrets.token_bytes(16)
    nonce = secrets.token_bytes(12)
    version = FORMAT_VERSION if bundle.tpm_secret is None else FORMAT_VERSION_WITH_TPM_SECRET
    header = _HEADER.pack(
        MAGIC, version, KDF_SCRYPT, params.log2_n, params.r, params.p, salt, nonce
    )
    key = _derive_key(passphrase, salt, params)
    data = header + AESGCM(key).encrypt(nonce, plaintext, header)
    if len(data) > MAX_BUNDLE_BYTES:
        raise BundleError(f"bundle of {len(data)} bytes exceeds the {MAX_BUNDLE_BYTES} allowed")
    return data


def read_bundle(data: bytes, passphrase: str) -> Bundle:
    """Authenticate, decrypt, parse and verify a bundle file; nothing is returned unless all
    of it is sound. Raises a `BundleError` subclass saying what is wrong."""
    if len(data) > MAX_BUNDLE_BYTES:
        raise BundleFormatError(f"bundle of {len(data)} bytes exceeds the {MAX_BUNDLE_BYTES}")
    if len(data) < HEADER_SIZE + _TAG_SIZE:
        raise BundleFormatError(f"bundle is truncated ({len(data)} bytes)")
    header = data[:HEADER_SIZE]
    magic, version, kdf, log2_n, r, p, salt, nonce = _HEADER.unpack(header)
    if magic != MAGIC:
        raise BundleFormatError("not a vTPM Keeper bundle (wrong magic)")
    if version not in (FORMAT_VERSION, FORMAT_VERSION_WITH_TPM_SECRET):
        raise BundleFormatError(f"bundle format version {version} is not supported")
    if kdf != KDF_SCRYPT:
        raise BundleFormatError(f"bundle key derivation {kdf} is not supported")
    params = ScryptParams(log2_n=log2_n, r=r, p=p)
    params.check()
    key = _derive_key(passphrase, salt, params)
    try:
        plaintext = AESGCM(key).decrypt(nonce, data[HEADER_SIZE:], header)
    except InvalidTag:
        raise BundleAuthenticationError(
            "bundle failed authentication: the passphrase is wrong, or the bundle was "
            "modified or truncated"
        ) from None
    bundle = _parse_plaintext(plaintext)
    # The version is authenticated (it is in the header): it must say what the manifest holds.
    if (bundle.tpm_secret is not None) != (version == FORMAT_VERSION_WITH_TPM_SECRET):
        raise BundleContentError(
            f"bundle format version {version} does not match whether it holds a TPM secret"
        )
    return bundle


def _derive_key(passphrase: str, salt: bytes, params: ScryptParams) -> bytes:
    if not passphrase:
        raise BundleError("the passphrase must not be empty")
    # NFC, so the same passphrase typed on different systems derives the same key.
    secret = unicodedata.normalize("NFC", passphrase).encode("utf-8")
    kdf = Scrypt(salt=salt, length=32, n=1 << params.log2_n, r=params.r, p=params.p)
    return kdf.derive(secret)


def _parse_plaintext(plaintext: bytes) -> Bundle:
    if len(plaintext) < _LENGTH.size:
        raise BundleContentError("bundle content is too short for a manifest")
    (manifest_size,) = _LENGTH.unpack_from(plaintext)
    if manifest_size > _MAX_MANIFEST_BYTES:
        raise BundleContentError(f"bundle manifest of {manifest_size} bytes is too large")
    start = _LENGTH.size
    manifest_json = plaintext[start : start + manifest_size]
    manifest = _parse_manifest(manifest_json)
    offset = start + manifest_size
    expected = offset + sum(entry.compressed_size for entry in manifest.entries)
    if expected != len(plaintext):
        raise BundleContentError(
            f"bundle content is {len(plaintext)} bytes, its manifest accounts for {expected}"
        )
    entries = []
    for item in manifest.entries:
        compressed = plaintext[offset : offset + item.compressed_size]
        offset += item.compressed_size
        blob = StateBlob(
            kind=item.kind,
            content_hash=item.content_hash,
            size=item.size,
            token=item.token,
            compressed=SecretBytes(compressed),
        )
        _verify_content(blob)
        entries.append(
            BundleEntry(blob=blob, version=item.version, host=item.host, stored_at=item.stored_at)
        )
    _check_entries(entries)
    return Bundle(
        vm_id=manifest.vm_id,
        exported_at=manifest.exported_at,
        entries=tuple(entries),
        tpm_secret=manifest.tpm_secret,
    )


def _parse_manifest(manifest_json: bytes) -> _Manifest:
    # Raised outside the except block: the ValidationError must not ride along as context.
    try:
        return _Manifest.model_validate_json(manifest_json)
    except ValidationError as error:
        problem = _describe(error)
    raise BundleContentError(f"bundle manifest is invalid ({problem})")


def _check_entries(entries: tuple[BundleEntry, ...] | list[BundleEntry]) -> None:
    kinds = [entry.blob.kind for entry in entries]
    if not kinds:
        raise BundleContentError("bundle holds no state")
    if len(set(kinds)) != len(kinds):
        raise BundleContentError("bundle holds the same kind of state twice")


def _verify_content(blob: StateBlob) -> None:
    """Bounded decompression, size and hash; for the TPM also the archive's rules."""
    try:
        content = open_blob(blob)
        if blob.kind is StateKind.TPM:
            unpack_tpm_state(content)
    except BlobFormatError as error:
        problem = str(error)
    else:
        return
    raise BundleContentError(f"{blob.kind} state in the bundle does not verify: {problem}")


def _describe(error: ValidationError) -> str:
    """Locations and error kinds only: pydantic's own text quotes the input."""
    parts = []
    for item in error.errors(include_url=False, include_input=False, include_context=False):
        location = ".".join(str(part) for part in item["loc"]) or "<root>"
        parts.append(f"{location}: {item['type']}")
    return "; ".join(parts[:10])
