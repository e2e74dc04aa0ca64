"""The endorsement key of a VM's stored TPM, for attestation services."""

from __future__ import annotations

from pydantic import Field

from keeper_shared.messages.envelope import Payload
from keeper_shared.messages.types import VmId


class ReadEndorsementKey(Payload):
    """Query to the store: the EK of the VM's newest stored TPM. Replied with
    :class:`EndorsementKeyRead`. The store loads a copy of that state into a throwaway swtpm
    to read it: seconds, not milliseconds."""

    message_type = "state.ek.read"

    vm_id: VmId = Field(description="The VM.")


class EndorsementKeyRead(Payload):
    """Reply to :class:`ReadEndorsementKey`: public material only, never the TPM's secrets."""

    message_type = "state.ek.read-result"

    vm_id: VmId = Field(description="The VM.")
    ok: bool = Field(description="False when there is no EK to show (see error).")
    error: str | None = Field(default=None, max_length=1024, description="Why not.")
    version: int | None = Field(default=None, ge=1, description="The TPM version read.")
    public_key_pem: str | None = Field(
        default=None,
        max_length=16 * 1024,
        description="The RSA EK's public key (PEM SubjectPublicKeyInfo), from persistent "
        "handle 0x81010001.",
    )
    certificate_pem: str | None = Field(
        default=None,
        max_length=32 * 1024,
        description="The EK certificate from NV index 0x01c00002 (PEM); None when the TPM "
        "was made without one.",
    )
    public_area_sha256: str | None = Field(
        default=None,
        description="sha256 of the EK's TPM2B_PUBLIC: the fingerprint the scrubber compares.",
    )
