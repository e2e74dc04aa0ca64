"""Sealed secrets as they travel: TPM and NVRAM state and TPM secrets, each encrypted to its
receiver's key (see ``keeper_shared.sealing``). What stays in clear is what the receiver
needs to route and check it: kind, declared hash, size, token, and the receiver's key id.
"""

from __future__ import annotations

import base64
from typing import Annotated

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PlainSerializer

from keeper_shared.messages.types import (
    MAX_COMPRESSED_BLOB_BYTES,
    ContentHash,
    FencingToken,
    SecretUuid,
    StateKind,
    decode_base64,
)
from keeper_shared.sealing.keys import KEY_ID_PATTERN

SEAL_OVERHEAD_BYTES = 16
"""AES-GCM's tag at the end of every ciphertext."""


def _to_base64(value: bytes) -> str:
    return base64.b64encode(value).decode()


Base64Bytes = Annotated[
    bytes,
    BeforeValidator(decode_base64),
    PlainSerializer(_to_base64, return_type=str, when_used="json"),
]
"""Bytes as base64 on the wire (not secret: ciphertext, nonces and public keys)."""


class SealedBlob(BaseModel):
    """A payload sealed to one receiver's X25519 key (ECIES: X25519, HKDF-SHA256,
    AES-256-GCM), bound to what it is; only that receiver's private key opens it."""

    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)

    key_id: str = Field(pattern=KEY_ID_PATTERN, description="The receiver's key id.")
    ephemeral_public_key: Base64Bytes = Field(
        min_length=32, max_length=32, description="The sender's one-time X25519 public key."
    )
    nonce: Base64Bytes = Field(min_length=12, max_length=12, description="AES-GCM nonce.")
    ciphertext: Base64Bytes = Field(
        min_length=SEAL_OVERHEAD_BYTES,
        max_length=MAX_COMPRESSED_BLOB_BYTES + SEAL_OVERHEAD_BYTES,
        description="The sealed payload, AES-GCM tag included.",
    )


class SealedStateBlob(BaseModel):
    """One VM's TPM or NVRAM state at one version as it travels: its compressed content
    sealed to the receiver, bound to the VM, kind, token and hash below."""

    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)

    kind: StateKind = Field(description="Which state this is.")
    content_hash: ContentHash = Field(description="sha256 of the uncompressed canonical content.")
    size: int = Field(ge=0, description="Length of the uncompressed canonical content.")
    token: FencingToken = Field(description="Fencing token of the version this blob is.")
    sealed: SealedBlob = Field(
        description="The canonical content compressed as one zstd frame, sealed."
    )
    swtpm_version: str | None = Field(
        default=None,
        max_length=32,
        description="swtpm version on the host that read this state (state formats change "
        "between versions; policy will not place a VM on an older swtpm).",
    )


class SealedTpmSecret(BaseModel):
    """The libvirt secret a VM's TPM state is encrypted with, its value sealed to the
    receiver and bound to the VM and the secret's UUID."""

    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)

    uuid: SecretUuid = Field(description="The secret's UUID (the TPM's `<encryption secret>`).")
    sealed: SealedBlob = Field(description="The secret's value (swtpm's passphrase), sealed.")
