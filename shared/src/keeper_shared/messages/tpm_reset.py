"""A TPM that changed identity unasked (invariant 10), and accepting it.

The store reads each TPM version's identity (a fingerprint of its endorsement primary seed)
when it persists it. A version whose TPM is not the VM's own is stored all the same, but
flagged at once (``state.tpm.reset``), and restores keep handing out the newest version of
the VM's own TPM until someone accepts the new one (``state.tpm.accept``) or the VM's own
TPM is back (``state.tpm.reset.cleared``). The scrubber, which loads versions into swtpm
later, announces an endorsement key change the same way for versions whose identity could
not be read when they were persisted.

Events are published by the state store (routing key ``<type>.state-store``); they carry
version numbers and one-way fingerprints, never state bytes or seeds.
"""

from __future__ import annotations

import enum
from typing import Any

from pydantic import Field

from keeper_shared.messages.envelope import Payload, register_upcaster
from keeper_shared.messages.types import ContentHash, VmId


class ResetFoundBy(enum.StrEnum):
    """Which check found the new TPM."""

    PERSIST = "persist"
    """The store, as it persisted the version (its identity is not the VM's own)."""
    SCRUB = "scrub"
    """The scrubber, whose throwaway swtpm read another endorsement key."""


class TpmReset(Payload):
    """The VM's stored TPM changed identity unasked: from ``version`` on it is another TPM
    (manufactured anew, or a state whose identity cannot be read), so whatever the guest
    had sealed is not in it.

    Found at persist time, the reset is pending: restores, the QEMU hook's ``state.newest``,
    clones and exports hand out ``previous_good_version`` (the VM's own TPM) instead of the
    newest until ``state.tpm.accept``; old versions stay in the history either way."""

    message_type = "state.tpm.reset"
    schema_version = 2

    vm_id: VmId = Field(description="The VM.")
    version: int = Field(ge=1, description="The first version with the new TPM.")
    previous_good_version: int = Field(
        ge=1,
        description="Newest earlier version of the VM's own TPM: the one restored next "
        "while the reset is pending.",
    )
    found_by: ResetFoundBy = Field(
        default=ResetFoundBy.SCRUB, description="Which check found it (v1 senders: scrub)."
    )
    identity: ContentHash | None = Field(
        default=None,
        description="Fingerprint (sha256, one-way) of the new TPM's endorsement primary "
        "seed; None when it could not be read (encrypted with a secret the store does not "
        "hold, or not a libtpms state), or found by the scrubber.",
    )
    previous_identity: ContentHash | None = Field(
        default=None, description="Fingerprint of the VM's own TPM; None when found by scrub."
    )
    ek_sha256: ContentHash | None = Field(
        default=None, description="sha256 of the new EK public area (found by scrub)."
    )
    previous_ek_sha256: ContentHash | None = Field(
        default=None, description="sha256 of the old EK public area (found by scrub)."
    )


@register_upcaster(TpmReset.message_type, 1)
def _tpm_reset_v1(data: dict[str, Any]) -> dict[str, Any]:
    """v1 came from the scrubber only, with both EK hashes."""
    return {**data, "found_by": ResetFoundBy.SCRUB.value}


class ResetClearing(enum.StrEnum):
    """How a TPM reset ended."""

    ACCEPTED = "accepted"
    """Someone accepted the newest TPM as the VM's own (``state.tpm.accept``)."""
    OWN_TPM_BACK = "own-tpm-back"
    """A version of the VM's own TPM was persisted again (it was restored and ran)."""
    RESTORED = "restored"
    """A restore asked for a version of another TPM, which is the VM's own from now on."""


class TpmResetCleared(Payload):
    """No TPM reset of the VM up to ``version`` is pending any more: restores hand out the
    newest version again."""

    message_type = "state.tpm.reset.cleared"

    vm_id: VmId = Field(description="The VM.")
    version: int = Field(
        ge=1, description="The newest stored TPM version when it ended: resets up to it are over."
    )
    how: ResetClearing = Field(description="How it ended.")
    reset_version: int | None = Field(
        default=None,
        ge=1,
        description="First version of the reset that was pending; None when none was (an "
        "accept after a reset only the scrubber found).",
    )


class AcceptTpm(Payload):
    """Command to the store: the VM's newest stored TPM is its own from now on (after a
    reset: a new TPM the guest was re-provisioned for). Older versions stay in the history.

    Replied with ``AcceptTpmReply``: ``version`` (the accepted one) and, when a reset was
    pending, ``reset_version``. Refused when the VM has no stored TPM. Idempotent."""

    message_type = "state.tpm.accept"

    vm_id: VmId = Field(description="The VM.")
    requested_by: str = Field(
        default="", max_length=256, description="Who asked, for the audit log."
    )
