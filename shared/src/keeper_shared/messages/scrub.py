"""Background verification of stored state: what the store's scrubber announces.

Events published by the state store (routing key ``<type>.state-store``). They carry
version numbers, reasons and public-key hashes, never state bytes. An endorsement key the
scrubber finds changed is announced as `keeper_shared.messages.tpm_reset.TpmReset`
(re-exported here for its earlier importers).
"""

from __future__ import annotations

from pydantic import Field

from keeper_shared.messages.envelope import Payload
from keeper_shared.messages.tpm_reset import TpmReset
from keeper_shared.messages.types import StateKind, VmId

__all__ = ["StateScrubFailed", "TpmReset"]


class StateScrubFailed(Payload):
    """A stored version failed verification: it would not restore as it was stored."""

    message_type = "state.scrub.failed"

    vm_id: VmId = Field(description="The VM.")
    kind: StateKind = Field(description="TPM or NVRAM.")
    version: int = Field(ge=1, description="The stored version that failed.")
    reason: str = Field(max_length=512, description="What failed (never any state bytes).")
