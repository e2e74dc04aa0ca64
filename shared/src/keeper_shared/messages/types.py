"""Field types shared by several message families."""

from __future__ import annotations

import base64
import enum
import uuid
from typing import Annotated

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    SecretBytes,
)

MAX_COMPRESSED_BLOB_BYTES = 6 * 1024 * 1024
"""Upper bound for one compressed blob on the wire (a 4 MB NVRAM is far below this)."""

HOST_ID_PATTERN = r"^[a-z0-9][a-z0-9-]{0,62}$"
"""Host ids become RabbitMQ user names and routing-key words, so keep them plain."""

VM_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
"""A libvirt domain name that is also safe as part of a file name (`<name>_VARS.fd`)."""

SHA256_HEX_PATTERN = r"^[0-9a-f]{64}$"


def _canonical_vm_id(value: str) -> str:
    """Accept only the canonical text of a UUID: VM ids become directory names."""
    try:
        parsed = uuid.UUID(value)
    except (ValueError, AttributeError, TypeError):
        raise ValueError("not a UUID") from None
    if str(parsed) != value.lower():
        raise ValueError("not a canonical UUID")
    return str(parsed)


VmId = Annotated[str, Field(max_length=36), AfterValidator(_canonical_vm_id)]
SecretUuid = VmId
"""A libvirt secret's UUID, held to the same canonical text as a VM id."""
HostId = Annotated[str, Field(pattern=HOST_ID_PATTERN)]
VmName = Annotated[str, Field(pattern=VM_NAME_PATTERN)]
ContentHash = Annotated[str, Field(pattern=SHA256_HEX_PATTERN)]


def decode_base64(value: object) -> object:
    """A base64 string from the wire as bytes (anything else as it is, for validation)."""
    if isinstance(value, str):
        # validate=True refuses anything outside the alphabet and bad padding in C; a
        # regular expression over the whole blob first cost as much as the decoding.
        try:
            return base64.b64decode(value, validate=True)
        except ValueError:
            raise ValueError("not base64") from None
    return value


def _encode_base64(value: SecretBytes) -> str:
    return base64.b64encode(value.get_secret_value()).decode()


SecretBlob = Annotated[
    SecretBytes,
    BeforeValidator(decode_base64),
    PlainSerializer(_encode_base64, return_type=str, when_used="json"),
    Field(max_length=MAX_COMPRESSED_BLOB_BYTES),
]
"""Blob bytes: base64 on the wire, masked in every repr, str and log line."""


MAX_TPM_SECRET_BYTES = 1024
"""Upper bound for a libvirt secret value swtpm derives its state key from (a passphrase)."""

SecretValue = Annotated[
    SecretBytes,
    BeforeValidator(decode_base64),
    PlainSerializer(_encode_base64, return_type=str, when_used="json"),
    Field(min_length=1, max_length=MAX_TPM_SECRET_BYTES),
]
"""A secret's value: base64 on the wire, masked in every repr, str and log line."""


class TpmSecret(BaseModel):
    """The libvirt secret (usage type ``vtpm``) swtpm encrypts a VM's TPM state with.

    A TPM state encrypted this way is useless on a host that lacks the secret, so the value
    travels with the state: in ``vm.prepare`` to the host the VM starts on, and in a fetch
    reply when a host read a secret the keeper did not create."""

    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)

    uuid: SecretUuid = Field(description="The secret's UUID (the TPM's `<encryption secret>`).")
    value: SecretValue = Field(description="The secret's value (swtpm's passphrase).")


class StateKind(enum.StrEnum):
    """The two pieces of state kept per VM."""

    TPM = "tpm"
    NVRAM = "nvram"


class FencingToken(BaseModel):
    """Orders writes for one VM: placement epoch first, then generation within it."""

    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)

    epoch: int = Field(ge=0, description="Raised each time the VM is placed on a host.")
    generation: int = Field(ge=0, description="Grows with every change within the epoch.")

    def is_newer_than(self, other: FencingToken) -> bool:
        """True when this token orders strictly after ``other``."""
        return (self.epoch, self.generation) > (other.epoch, other.generation)


class StateBlob(BaseModel):
    """One VM's TPM or NVRAM state at one version, compressed, as it travels."""

    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)

    kind: StateKind = Field(description="Which state this is.")
    content_hash: ContentHash = Field(description="sha256 of the uncompressed canonical content.")
    size: int = Field(ge=0, description="Length of the uncompressed canonical content.")
    token: FencingToken = Field(description="Fencing token of the version this blob is.")
    compressed: SecretBlob = Field(
        description="Canonical content compressed as one zstd frame (a zlib stream, as older "
        "versions wrote, is still accepted)."
    )
    swtpm_version: str | None = Field(
        default=None,
        max_length=32,
        description="swtpm version on the host that read this state (state formats change "
        "between versions; policy will not place a VM on an older swtpm).",
    )
