"""X25519 key pairs for sealing: ids, files, and the private keys one receiver holds.

A key's id is derived from its public key (the first 16 hex chars of its sha256), so a new
key always has a new id and nothing has to hand ids out. A receiver holds its current
private key and, after a rotation, the previous ones: whatever was sealed to an old key
and is still in a queue opens until the old key file is removed.

Private key files are PKCS#8 PEM, mode 0600; like the store's KEK file, one that group or
others may access is refused. Nothing here puts key bytes into a repr or an error text.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from keeper_shared.runtime.private_files import (
    PrivateFileError,
    create_private_file,
    read_private_file,
)

KEY_ID_HEX_CHARS = 16
KEY_ID_PATTERN = r"^[0-9a-f]{16}$"
SEALING_PUBLIC_KEY_PATTERN = r"^[A-Za-z0-9+/]{43}=$"
"""A raw 32-byte X25519 public key in base64."""
_MAX_KEY_FILE_BYTES = 4096


class SealingKeyFileError(PrivateFileError):
    """A sealing key file is missing, unsafe or not a key (the text never holds key bytes)."""


def raw_public_bytes(key: X25519PublicKey) -> bytes:
    """The 32 raw bytes of a public key."""
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id_of(key: X25519PublicKey) -> str:
    """A public key's id: the first 16 hex chars of the sha256 of its raw bytes."""
    return hashlib.sha256(raw_public_bytes(key)).hexdigest()[:KEY_ID_HEX_CHARS]


@dataclass(frozen=True, slots=True)
class SealingPublicKey:
    """A receiver's public key and its id: what a sender seals to."""

    key: X25519PublicKey

    @property
    def key_id(self) -> str:
        """This key's id."""
        return key_id_of(self.key)

    def to_text(self) -> str:
        """The raw public key as base64 (how it is configured and announced)."""
        return base64.b64encode(raw_public_bytes(self.key)).decode()

    @classmethod
    def from_text(cls, text: str) -> SealingPublicKey:
        """Parse `to_text`'s form; `ValueError` when it is not a 32-byte key."""
        try:
            raw = base64.b64decode(text.strip(), validate=True)
        except ValueError:
            raise ValueError("sealing public key is not base64") from None
        if len(raw) != 32:
            raise ValueError(f"sealing public key is {len(raw)} bytes, not 32")
        return cls(X25519PublicKey.from_public_bytes(raw))


class SealingPrivateKeys:
    """A receiver's private keys by id: the current one, which its senders seal to, and
    previous ones, kept only to open what was sealed before a rotation."""

    __slots__ = ("_by_id", "_current")

    def __init__(
        self, current: X25519PrivateKey, previous: Iterable[X25519PrivateKey] = ()
    ) -> None:
        self._current = current
        self._by_id: dict[str, X25519PrivateKey] = {key_id_of(current.public_key()): current}
        for key in previous:
            self._by_id.setdefault(key_id_of(key.public_key()), key)

    @classmethod
    def from_files(cls, current: Path, previous: Iterable[Path] = ()) -> SealingPrivateKeys:
        """Load the current and previous private key files (see `load_private_key`)."""
        return cls(load_private_key(current), [load_private_key(path) for path in previous])

    @property
    def public(self) -> SealingPublicKey:
        """The current key's public half: what senders are told to seal to."""
        return SealingPublicKey(self._current.public_key())

    @property
    def key_ids(self) -> tuple[str, ...]:
        """Ids of every key held, the current one first."""
        return tuple(self._by_id)

    def get(self, key_id: str) -> X25519PrivateKey | None:
        """The private key with this id, if held."""
        return self._by_id.get(key_id)

    def __repr__(self) -> str:
        return f"SealingPrivateKeys(key_ids={self.key_ids!r})"


def load_private_key(path: Path) -> X25519PrivateKey:
    """Read an X25519 private key (PKCS#8 PEM) from ``path``, refusing a file that is not
    regular, that group or others may access, or that holds no X25519 key."""
    content = read_private_file(
        path, label="sealing key", max_size=_MAX_KEY_FILE_BYTES, error=SealingKeyFileError
    )
    problem: str | None = None
    try:
        key = serialization.load_pem_private_key(content, password=None)
    except (ValueError, TypeError):
        problem = "is not a PEM private key"
    if problem is not None:
        raise SealingKeyFileError(f"sealing key {path} {problem}")
    if not isinstance(key, X25519PrivateKey):
        raise SealingKeyFileError(f"sealing key {path} is not an X25519 key")
    return key


def private_key_pem(key: X25519PrivateKey) -> bytes:
    """A private key as unencrypted PKCS#8 PEM (the file's protection is its mode)."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def create_private_key_file(path: Path) -> X25519PrivateKey:
    """Write a new private key to ``path`` (mode 0600) and return it; refuses to overwrite
    (`SealingKeyFileError`). The file appears complete or not at all (see
    `create_private_file`)."""
    key = X25519PrivateKey.generate()
    path.parent.mkdir(parents=True, exist_ok=True)
    create_private_file(path, private_key_pem(key), label="sealing key", error=SealingKeyFileError)
    return key


def load_or_create_private_key(path: Path) -> X25519PrivateKey:
    """The key in ``path``, created first when there is no file (a host's first start)."""
    if not path.exists():
        try:
            return create_private_key_file(path)
        except SealingKeyFileError:
            if not path.exists():
                raise  # not another process's key made meanwhile: the reason stands
    return load_private_key(path)
