"""Background verification of stored state: what the store's scrubber announces.

Both are events published by the state store (routing key ``<type>.state-store``). They
carry version numbers, reasons and public-key hashes, never state bytes.
"""

from __future__ import annotations

from pydantic import Field

from keeper_shared.messages.envelope import Payload
from keeper_shared.messages.types import ContentHash, StateKind, VmId


class StateScrubFailed(Payload):
    """A stored version failed verification: it would not restore as it was stored."""

    message_type = "state.scrub.failed"

    vm_id: VmId = Field(description="The VM.")
    kind: StateKind = Field(description="TPM or NVRAM.")
    version: int = Field(ge=1, description="The stored version that failed.")
    reason: str = Field(max_length=512, description="What failed (never any state bytes).")


class TpmReset(Payload):
    """A stored TPM version has another endorsement key than the version before it.

    The guest's TPM was reset or replaced (a new TPM was manufactured), so whatever it had
    sealed is gone from this version on; ``previous_good_version`` is the newest earlier
    version with the old identity, which an operator can restore."""

    message_type = "state.tpm.reset"

    vm_id: VmId = Field(description="The VM.")
    version: int = Field(ge=1, description="The first version with the new endorsement key.")
    previous_good_version: int = Field(
        ge=1, description="Newest earlier version that verified, with the old endorsement key."
    )
    ek_sha256: ContentHash = Field(description="sha256 of the new EK public area.")
    previous_ek_sha256: ContentHash = Field(description="sha256 of the old EK public area.")
