"""Encryption at rest: a key-encryption key from a file, per-VM data keys, sealed blobs.

The layering is the usual envelope scheme. A key-encryption key (KEK) lives in a file
outside Redis. Each VM gets its own random data key (DEK); Redis holds the DEK only wrapped
by the KEK (AES key wrap, RFC 3394) together with the KEK's id, so a rotation can find and
rewrap every record. Blobs are sealed with AES-256-GCM under the DEK, and the associated
data binds each ciphertext to its VM, kind and version token.

Nothing in this module puts key bytes or plaintext into a repr, an exception message or an
exception chain (invariant 4): errors say what went wrong and where, never with what.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.keywrap import (
    InvalidUnwrap,
    aes_key_unwrap,
    aes_key_wrap,
)

from keeper_shared.runtime.private_files import (
    PrivateFileError,
    create_private_file,
    read_private_file,
)

KEY_SIZE: Final = 32
"""Both KEK and DEK are AES-256 keys."""

_KEY_ID_HEX_CHARS: Final = 8
_WRAPPED_KEY_SIZE: Final = KEY_SIZE + 8  # RFC 3394 adds one 64-bit integrity block
_WRAPPED_KEY_FORMAT_V1: Final = 1
_SEALED_BLOB_FORMAT_V1: Final = 1
_NONCE_SIZE: Final = 12
_TAG_SIZE: Final = 16
# A key file is 32 raw bytes or at most ~70 characters of text; anything far larger is
# a wrong path, and reading it whole would be pointless.
_MAX_KEY_FILE_SIZE: Final = 4096
_AAD_DOMAIN: Final = b"vtpm-keeper/blob-aad/v1"
_TPM_SECRET_AAD_DOMAIN: Final = b"vtpm-keeper/tpm-secret/v1"
BLOB_KINDS: Final = frozenset({"tpm", "nvram"})
"""The kinds of state a sealed blob can hold."""


class EncryptionError(Exception):
    """Base class for every error raised by this module."""


class KeyFileError(EncryptionError, PrivateFileError):
    """A key file is missing, unsafe (too open) or does not hold a usable key."""


class DecryptionError(EncryptionError):
    """Data could not be authenticated and decrypted (wrong key, tampered, malformed)."""


def _key_id(material: bytes) -> str:
    return hashlib.sha256(material).hexdigest()[:_KEY_ID_HEX_CHARS]


class KeyEncryptionKey:
    """The key that wraps per-VM data keys; it is never stored in Redis.

    ``key_id`` (first 8 hex chars of the key's SHA-256) is recorded with every wrapped
    data key so a record names the KEK that can open it, which is what rotation needs.
    """

    __slots__ = ("_key_id", "_material")

    def __init__(self, material: bytes) -> None:
        """Hold ``material``, which must be exactly 32 bytes."""
        if len(material) != KEY_SIZE:
            msg = f"a key-encryption key must be {KEY_SIZE} bytes, got {len(material)}"
            raise ValueError(msg)
        self._material = bytes(material)
        self._key_id = _key_id(self._material)

    @property
    def key_id(self) -> str:
        """Short public id of this key (not secret: 32 bits of a hash of 256 random bits)."""
        return self._key_id

    @property
    def material(self) -> bytes:
        """The raw key bytes, for the cipher only; never log or serialise them."""
        return self._material

    def __repr__(self) -> str:
        return f"KeyEncryptionKey(key_id={self.key_id!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, KeyEncryptionKey):
            return NotImplemented
        return hmac.compare_digest(self._material, other._material)

    __hash__ = None  # type: ignore[assignment]


class DataKey:
    """A per-VM AES-256 data key; its repr never shows the key."""

    __slots__ = ("_material",)

    def __init__(self, material: bytes) -> None:
        """Hold ``material``, which must be exactly 32 bytes."""
        if len(material) != KEY_SIZE:
            msg = f"a data key must be {KEY_SIZE} bytes, got {len(material)}"
            raise ValueError(msg)
        self._material = bytes(material)

    @property
    def material(self) -> bytes:
        """The raw key bytes, for the cipher only; never log or serialise them."""
        return self._material

    def __repr__(self) -> str:
        return "DataKey(<redacted>)"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, DataKey):
            return NotImplemented
        return hmac.compare_digest(self._material, other._material)

    __hash__ = None  # type: ignore[assignment]


@dataclass(frozen=True, slots=True)
class WrappedKey:
    """A data key wrapped by a KEK, as stored next to a VM's blobs.

    Storage format (version 1): one version byte, the 8 ASCII hex chars of the KEK id,
    then the 40 bytes of RFC 3394 output.
    """

    kek_id: str
    """Id of the KEK that wrapped this key (see `KeyEncryptionKey.key_id`)."""
    wrapped: bytes
    """The RFC 3394 output; useless without the KEK."""

    def __repr__(self) -> str:
        # The wrapped bytes are not secret on their own, but nothing is gained by printing
        # them and it keeps every key-shaped byte string out of logs.
        return f"WrappedKey(kek_id={self.kek_id!r}, wrapped=<{len(self.wrapped)} bytes>)"

    def to_bytes(self) -> bytes:
        """Serialise for storage (e.g. a Redis hash field)."""
        return bytes([_WRAPPED_KEY_FORMAT_V1]) + self.kek_id.encode("ascii") + self.wrapped

    @classmethod
    def from_bytes(cls, data: bytes) -> WrappedKey:
        """Parse what `to_bytes` produced; raise `DecryptionError` if it is malformed."""
        expected = 1 + _KEY_ID_HEX_CHARS + _WRAPPED_KEY_SIZE
        if len(data) != expected:
            msg = f"wrapped key record has {len(data)} bytes, expected {expected}"
            raise DecryptionError(msg)
        if data[0] != _WRAPPED_KEY_FORMAT_V1:
            msg = f"wrapped key record has unknown format version {data[0]}"
            raise DecryptionError(msg)
        raw_id = data[1 : 1 + _KEY_ID_HEX_CHARS]
        if not all(c in b"0123456789abcdef" for c in raw_id):
            msg = "wrapped key record has a malformed KEK id"
            raise DecryptionError(msg)
        return cls(kek_id=raw_id.decode("ascii"), wrapped=data[1 + _KEY_ID_HEX_CHARS :])


def _parse_key_material(path: Path, content: bytes) -> bytes:
    if len(content) == KEY_SIZE:
        # 32 printable characters are a password typed into a file, not random key bytes
        # (random bytes are all printable with probability ~1e-14): refuse, don't weaken.
        if all(32 <= c < 127 or c in b"\t\n\r" for c in content):
            msg = (
                f"key file {path} holds 32 characters of text; expected 32 random bytes, "
                "64 hex characters or base64 of 32 bytes"
            )
            raise KeyFileError(msg)
        return content
    try:
        text = content.decode("ascii").strip()
    except UnicodeDecodeError:
        msg = f"key file {path} holds {len(content)} bytes of binary; expected {KEY_SIZE}"
        raise KeyFileError(msg) from None
    if len(text) == 2 * KEY_SIZE and all(c in "0123456789abcdefABCDEF" for c in text):
        return bytes.fromhex(text)
    try:
        decoded = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        # `from None`: the decoder's message is not secret today, but the chain adds nothing
        # and a future message might quote the input.
        msg = f"key file {path} is neither 64 hex characters nor valid base64"
        raise KeyFileError(msg) from None
    if len(decoded) != KEY_SIZE:
        msg = f"key file {path} decodes to {len(decoded)} bytes; expected {KEY_SIZE}"
        raise KeyFileError(msg)
    return decoded


def load_key_encryption_key(path: Path) -> KeyEncryptionKey:
    """Read the KEK from ``path``: 32 raw bytes, 64 hex chars or base64 (whitespace ok).

    Refuses a file that group or others can access (``mode & 0o077``), that is not a
    regular file, or whose content is not exactly a 32-byte key, with a `KeyFileError`
    naming the path and the problem but never the content (see `read_private_file`).
    """
    content = read_private_file(
        path, label="key file", max_size=_MAX_KEY_FILE_SIZE, error=KeyFileError
    )
    return KeyEncryptionKey(_parse_key_material(path, content))


def generate_key_file(path: Path) -> KeyEncryptionKey:
    """Create ``path`` holding a new random KEK (64 hex chars), mode 0600, and return it.

    Refuses to overwrite an existing file (`KeyFileError`); the file appears either
    complete or not at all (see `create_private_file`).
    """
    material = secrets.token_bytes(KEY_SIZE)
    create_private_file(
        path, material.hex().encode("ascii") + b"\n", label="key file", error=KeyFileError
    )
    return KeyEncryptionKey(material)


def new_data_key() -> DataKey:
    """Return a fresh random 32-byte data key for one VM."""
    return DataKey(secrets.token_bytes(KEY_SIZE))


def wrap_data_key(kek: KeyEncryptionKey, dek: DataKey) -> WrappedKey:
    """Wrap ``dek`` under ``kek`` (AES key wrap) for storage beside the VM's blobs."""
    return WrappedKey(kek_id=kek.key_id, wrapped=aes_key_wrap(kek.material, dek.material))


def unwrap_data_key(kek: KeyEncryptionKey, wrapped: WrappedKey) -> DataKey:
    """Unwrap a data key; raise `DecryptionError` if ``kek`` is not the key that wrapped it."""
    if wrapped.kek_id != kek.key_id:
        msg = f"data key was wrapped by KEK {wrapped.kek_id}, not by KEK {kek.key_id}"
        raise DecryptionError(msg)
    try:
        material = aes_key_unwrap(kek.material, wrapped.wrapped)
    except (InvalidUnwrap, ValueError):
        msg = f"data key failed its integrity check under KEK {kek.key_id}"
        raise DecryptionError(msg) from None
    if len(material) != KEY_SIZE:
        msg = f"unwrapped data key has {len(material)} bytes, expected {KEY_SIZE}"
        raise DecryptionError(msg)
    return DataKey(material)


def rewrap_data_key(
    old_kek: KeyEncryptionKey, new_kek: KeyEncryptionKey, wrapped: WrappedKey
) -> WrappedKey:
    """Move a wrapped data key from ``old_kek`` to ``new_kek`` (KEK rotation).

    The blobs sealed under the data key stay valid: only the wrapping changes.
    """
    return wrap_data_key(new_kek, unwrap_data_key(old_kek, wrapped))


def encrypt_blob(dek: DataKey, plaintext: bytes, associated_data: bytes) -> bytes:
    """Seal ``plaintext`` with AES-256-GCM under ``dek``.

    Returns one version byte, the 12-byte random nonce, then ciphertext and tag. A random
    96-bit nonce is safe here because a per-VM key seals only a handful of blobs per state
    change, far below the ~2**32 messages where random nonces start to risk a repeat.
    ``associated_data`` should come from `blob_associated_data`.
    """
    nonce = secrets.token_bytes(_NONCE_SIZE)
    sealed = AESGCM(dek.material).encrypt(nonce, plaintext, associated_data)
    return bytes([_SEALED_BLOB_FORMAT_V1]) + nonce + sealed


def decrypt_blob(dek: DataKey, sealed: bytes, associated_data: bytes) -> bytes:
    """Open what `encrypt_blob` sealed; raise `DecryptionError` on any mismatch.

    Wrong key, wrong associated data (another VM, kind or version), a flipped bit and a
    truncated input all fail the same way, and the error never carries any of the bytes.
    """
    if len(sealed) < 1 + _NONCE_SIZE + _TAG_SIZE:
        msg = f"sealed blob is truncated ({len(sealed)} bytes)"
        raise DecryptionError(msg)
    if sealed[0] != _SEALED_BLOB_FORMAT_V1:
        msg = f"sealed blob has unknown format version {sealed[0]}"
        raise DecryptionError(msg)
    nonce = sealed[1 : 1 + _NONCE_SIZE]
    try:
        return AESGCM(dek.material).decrypt(nonce, sealed[1 + _NONCE_SIZE :], associated_data)
    except InvalidTag:
        msg = "sealed blob failed authentication (wrong key, wrong binding or tampered)"
        raise DecryptionError(msg) from None


def _length_prefixed(field: bytes) -> bytes:
    return struct.pack(">I", len(field)) + field


def blob_associated_data(
    vm_id: str, kind: str, epoch: int, generation: int, content_hash: str
) -> bytes:
    """Canonical AES-GCM associated data binding a sealed blob to its VM, kind and version.

    Fields are length-prefixed (4-byte big-endian) after a domain tag, so no choice of
    field values can make two different tuples encode the same way; the integers are
    fixed-width unsigned 64-bit. ``vm_id`` is bound byte for byte, so callers must pass
    its canonical (lowercase UUID) form on both sides.
    """
    if kind not in BLOB_KINDS:
        msg = f"unknown blob kind {kind!r}; expected one of {sorted(BLOB_KINDS)}"
        raise ValueError(msg)
    for name, value in (("epoch", epoch), ("generation", generation)):
        if not 0 <= value < 2**64:
            msg = f"{name} must be a non-negative 64-bit integer, got {value}"
            raise ValueError(msg)
    return b"".join(
        (
            _length_prefixed(_AAD_DOMAIN),
            _length_prefixed(vm_id.encode("utf-8")),
            _length_prefixed(kind.encode("utf-8")),
            struct.pack(">QQ", epoch, generation),
            _length_prefixed(content_hash.encode("utf-8")),
        )
    )


def tpm_secret_associated_data(vm_id: str, secret_uuid: str) -> bytes:
    """AES-GCM associated data binding a sealed TPM secret value to its VM and UUID, under
    its own domain tag so a sealed secret can never pass for a sealed blob or the reverse."""
    return b"".join(
        (
            _length_prefixed(_TPM_SECRET_AAD_DOMAIN),
            _length_prefixed(vm_id.encode("utf-8")),
            _length_prefixed(secret_uuid.encode("utf-8")),
        )
    )
