"""Opening a permall swtpm encrypted with a libvirt secret, as swtpm itself opens it.

libvirt hands swtpm the secret's value on a file descriptor (``--key
pwdfd=N,mode=aes-256-cbc``); swtpm derives the key with PBKDF2-HMAC-SHA512 over the whole
value, salt ``swtpm``, 1000 iterations (``src/swtpm/key.c``, its default ``kdf=pbkdf2``),
16 or 32 bytes long as the header's 256-bit flag says. Under header version 2 the blob
holds the ciphertext (tag 2), an HMAC-SHA256 with that key over the ciphertext and then the
IV record (tag 3), and the IV (tag 6, its first 16 bytes used; all zeros when absent).
AES-CBC, padded with the pad length in every pad byte (``src/swtpm/swtpm_aes.c``).

The HMAC is checked before anything is decrypted: a wrong secret is an `OpenError`, never
garbage read as a TPM. Version 1's encrypted layout (swtpm before 0.2) is not read.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Final

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from keeper_state_store.identity.permall import (
    FLAG_ENCRYPTED_256BIT_KEY,
    FLAG_MIGRATION_ENCRYPTED,
    TAG_ENCRYPTED_DATA,
    TAG_HMAC,
    TAG_IVEC_ENCRYPTED_DATA,
    PermallFormatError,
    SwtpmBlob,
)

_SALT: Final = b"swtpm"
_ITERATIONS: Final = 1000
_BLOCK: Final = 16


class OpenError(PermallFormatError):
    """The encrypted state does not open with this secret, or is laid out unexpectedly."""


def state_key(passphrase: bytes, *, long_key: bool) -> bytes:
    """The AES key swtpm derives from a libvirt secret's value."""
    return hashlib.pbkdf2_hmac(
        "sha512", passphrase, _SALT, _ITERATIONS, dklen=32 if long_key else 16
    )


def decrypt_state(blob: SwtpmBlob, passphrase: bytes) -> bytes:
    """The libtpms state inside an encrypted blob."""
    if blob.version != 2:
        raise OpenError(f"encrypted swtpm header version {blob.version} is not read here")
    if blob.flags & FLAG_MIGRATION_ENCRYPTED:
        raise OpenError("the state is encrypted with a migration key")
    ciphertext = blob.records.get(TAG_ENCRYPTED_DATA)
    tag = blob.records.get(TAG_HMAC)
    if ciphertext is None or tag is None:
        raise OpenError("the encrypted state has no ciphertext or no HMAC record")
    iv_record = blob.records.get(TAG_IVEC_ENCRYPTED_DATA, b"")
    key = state_key(passphrase, long_key=bool(blob.flags & FLAG_ENCRYPTED_256BIT_KEY))
    expected = hmac.new(key, ciphertext + iv_record, hashlib.sha256).digest()
    if not hmac.compare_digest(expected, tag):
        raise OpenError("the encrypted state does not open with the VM's secret")
    if not ciphertext or len(ciphertext) % _BLOCK:
        raise OpenError("the ciphertext is not whole AES blocks")
    if iv_record and len(iv_record) < _BLOCK:
        raise OpenError("the IV record is too short")
    iv = iv_record[:_BLOCK] if iv_record else bytes(_BLOCK)
    decryptor = Cipher(algorithms.AES(key), modes.CBC(iv)).decryptor()
    padded = decryptor.update(ciphertext) + decryptor.finalize()
    pad = padded[-1]
    if not 0 < pad <= len(key) or padded[-pad:] != bytes([pad]) * pad:
        raise OpenError("the decrypted state has no valid padding")
    return padded[:-pad]
