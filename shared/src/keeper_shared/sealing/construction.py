"""Seal one payload to a receiver's X25519 public key, and open it with the private key.

The construction is ECIES as in SEC 1 / RFC 9180's base mode, built from `cryptography`'s
primitives only (no home-made cipher):

1. the sender makes an ephemeral X25519 key pair and agrees a shared secret with the
   receiver's public key;
2. HKDF-SHA256 derives a 256-bit key from it, salted with both public keys (so the key
   depends on who it was made for) and labelled with this construction's version;
3. AES-256-GCM encrypts the payload under a random 96-bit nonce, with associated data
   that names what the payload is (`SealBinding`) and the receiver's key id.

A fresh key per payload means a nonce is never reused under one key. A payload opened
with another binding (moved to another VM, kind, version, hash or receiver), or altered
in any byte, fails with `SealingError`; the error never quotes the payload.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from keeper_shared.sealing.keys import SealingPrivateKeys, SealingPublicKey, raw_public_bytes

CONSTRUCTION = "vtpm-keeper-seal-v1"
"""Names the construction in the KDF label and the associated data: a later one differs."""

NONCE_BYTES = 12


class SealingError(Exception):
    """A sealed payload cannot be opened: wrong receiver, wrong binding, or altered."""


@dataclass(frozen=True, slots=True)
class SealBinding:
    """What a sealed payload is, authenticated with it (never encrypted, never secret).

    ``token`` is the version's fencing token (``epoch.generation``) and, for a command,
    the command's epoch too; ``content_hash`` is the sha256 the message declares for the
    clear content (empty for a payload that has none, such as a TPM secret, whose ``token``
    is then its UUID)."""

    vm_id: str
    kind: str
    token: str
    content_hash: str

    def associated_data(self, key_id: str) -> bytes:
        """The AEAD's associated data: canonical JSON, so no two bindings encode alike."""
        document = {
            "construction": CONSTRUCTION,
            "vm_id": self.vm_id,
            "kind": self.kind,
            "token": self.token,
            "content_hash": self.content_hash,
            "key_id": key_id,
        }
        return json.dumps(document, sort_keys=True, separators=(",", ":")).encode()


@dataclass(frozen=True, slots=True)
class SealedPayload:
    """A payload as it travels: the receiver's key id, the sender's ephemeral public key,
    the nonce and the ciphertext (with GCM's 16-byte tag at its end)."""

    key_id: str
    ephemeral_public_key: bytes
    nonce: bytes
    ciphertext: bytes


def _derive_key(shared: bytes, ephemeral: bytes, receiver: bytes) -> bytes:
    return HKDF(
        algorithm=hashes.SHA256(),
        length=32,
        salt=ephemeral + receiver,
        info=CONSTRUCTION.encode(),
    ).derive(shared)


def seal(payload: bytes, receiver: SealingPublicKey, binding: SealBinding) -> SealedPayload:
    """Encrypt ``payload`` so that only the holder of ``receiver``'s private key opens it,
    and only under the same ``binding``."""
    ephemeral = X25519PrivateKey.generate()
    ephemeral_public = raw_public_bytes(ephemeral.public_key())
    receiver_public = raw_public_bytes(receiver.key)
    key = _derive_key(ephemeral.exchange(receiver.key), ephemeral_public, receiver_public)
    nonce = os.urandom(NONCE_BYTES)
    ciphertext = AESGCM(key).encrypt(nonce, payload, binding.associated_data(receiver.key_id))
    return SealedPayload(receiver.key_id, ephemeral_public, nonce, ciphertext)


def open_sealed(sealed: SealedPayload, keys: SealingPrivateKeys, binding: SealBinding) -> bytes:
    """The payload ``sealed`` holds, or `SealingError` saying why it cannot be opened (a
    key this receiver does not hold, or a binding or byte that does not match)."""
    private = keys.get(sealed.key_id)
    if private is None:
        raise SealingError(
            f"sealed for key {sealed.key_id}, which this receiver does not hold "
            f"(it holds {', '.join(keys.key_ids)})"
        )
    if len(sealed.nonce) != NONCE_BYTES or len(sealed.ephemeral_public_key) != 32:
        raise SealingError("sealed payload is malformed (nonce or ephemeral key length)")
    receiver_public = raw_public_bytes(private.public_key())
    problem: str | None = None
    try:
        shared = private.exchange(X25519PublicKey.from_public_bytes(sealed.ephemeral_public_key))
        key = _derive_key(shared, sealed.ephemeral_public_key, receiver_public)
        return AESGCM(key).decrypt(
            sealed.nonce, sealed.ciphertext, binding.associated_data(sealed.key_id)
        )
    except InvalidTag:
        problem = (
            f"sealed {binding.kind} of VM {binding.vm_id} does not open: altered, or bound "
            "to another VM, kind, token, hash or key"
        )
    except ValueError:  # a low-order ephemeral point (an all-zero shared secret)
        problem = "sealed payload carries an invalid ephemeral public key"
    raise SealingError(problem)
