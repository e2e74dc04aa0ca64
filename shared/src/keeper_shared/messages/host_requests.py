"""What a host agent asks policy and the store for itself, when a VM manager other than the
keeper starts a VM on its host (the libvirt QEMU hook's ``prepare begin``).

These travel on their own queues (``topology.POLICY_HOST_REQUESTS``,
``topology.STATE_STORE_HOST_REQUESTS``), the only commands a host's broker user may send:
a host must not be able to place, stop or delete VMs through policy's general commands.
"""

from __future__ import annotations

import enum
from typing import Any

from pydantic import Field

from keeper_shared.messages.envelope import Payload, register_upcaster
from keeper_shared.messages.sealed import SealedStateBlob, SealedTpmSecret
from keeper_shared.messages.types import HostId, StateKind, VmId
from keeper_shared.sealing.keys import SEALING_PUBLIC_KEY_PATTERN


class ClaimPlacement(Payload):
    """Request to policy: a VM manager is starting this VM on this host; make this host its
    placement (a new epoch fences the previous one). Replied with `PlacementClaimed`."""

    message_type = "vm.claim"

    vm_id: VmId = Field(description="The domain's UUID.")
    host: HostId = Field(description="The host it is starting on (the requester).")
    name: str = Field(max_length=256, description="The libvirt domain name, for the logs.")


class ClaimOutcome(enum.StrEnum):
    """What policy did with a claim."""

    UNREGISTERED = "unregistered"
    """The VM is not protected by the keeper: nothing to restore, the start goes on."""
    KEPT = "kept"
    """Already placed on this host: its local state is its newest."""
    MOVED = "moved"
    """Placed here now, under a new epoch (from nowhere or from another host)."""
    REFUSED = "refused"
    """It may not start here now; ``reason`` says why."""


class PlacementClaimed(Payload):
    """Reply to `ClaimPlacement`."""

    message_type = "vm.claimed"

    vm_id: VmId = Field(description="The VM.")
    outcome: ClaimOutcome = Field(description="What policy did.")
    epoch: int = Field(default=0, ge=0, description="The placement epoch on this host now.")
    previous_host: HostId | None = Field(
        default=None, description="Where it was placed before a move, if anywhere."
    )
    reason: str | None = Field(default=None, max_length=512, description="Why, when refused.")


class ReadNewestState(Payload):
    """Request to the store: the VM's newest stored TPM and NVRAM, verified, for the host it
    is placed on. Replied with `NewestState`."""

    message_type = "state.newest"
    schema_version = 2

    vm_id: VmId = Field(description="The VM.")
    host: HostId = Field(description="The requesting host; must be the VM's placement.")
    sealing_key: str | None = Field(
        default=None,
        pattern=SEALING_PUBLIC_KEY_PATTERN,
        description="The host's current X25519 public key (base64), as its heartbeats announce "
        "it: the store seals the reply to it, and learns it, only when the request comes "
        "from the host's own broker user (a start right after the agent's first heartbeat "
        "need not wait for the store to have handled one).",
    )


@register_upcaster(ReadNewestState.message_type, 1)
def _read_newest_state_v1(data: dict[str, Any]) -> dict[str, Any]:
    """v1 named no key: the store seals to the one the host's heartbeats announced."""
    return data


class NewestState(Payload):
    """Reply to `ReadNewestState`: the newest verified version of each kind stored (none
    for a VM the store holds nothing of), sealed to the requesting host's key, or why they
    cannot be given.

    v2 seals the blobs and the secret; v1 carried them in clear and is refused."""

    message_type = "state.newest.read"
    schema_version = 2

    vm_id: VmId = Field(description="The VM.")
    refused: str | None = Field(
        default=None,
        max_length=512,
        description="Why the stored state cannot be given (not placed there, does not "
        "verify); None when the blobs below are the whole answer.",
    )
    tpm: SealedStateBlob | None = Field(default=None, description="Newest TPM state, if stored.")
    nvram: SealedStateBlob | None = Field(default=None, description="Newest NVRAM, if stored.")
    versions: dict[StateKind, int] = Field(
        default_factory=dict, description="The version number of each blob given."
    )
    tpm_secret: SealedTpmSecret | None = Field(
        default=None, description="The secret the TPM state is encrypted with, if any."
    )
