"""A sealed payload as the construction returns it, and as a message field carries it."""

from __future__ import annotations

from keeper_shared.messages.sealed import SealedBlob
from keeper_shared.sealing.construction import SealedPayload


def to_sealed_blob(payload: SealedPayload) -> SealedBlob:
    """The message field for ``payload``."""
    return SealedBlob(
        key_id=payload.key_id,
        ephemeral_public_key=payload.ephemeral_public_key,
        nonce=payload.nonce,
        ciphertext=payload.ciphertext,
    )


def to_payload(sealed: SealedBlob) -> SealedPayload:
    """The construction's view of a message field."""
    return SealedPayload(
        sealed.key_id, sealed.ephemeral_public_key, sealed.nonce, sealed.ciphertext
    )
