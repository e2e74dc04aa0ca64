"""Placing and stopping VMs: requests to policy and the facts it records."""

from __future__ import annotations

import enum

from pydantic import Field

from keeper_shared.messages.envelope import Payload
from keeper_shared.messages.types import HostId, VmId


class PlaceVm(Payload):
    """Command to policy: start this VM on this host with its newest state."""

    message_type = "vm.place"

    vm_id: VmId = Field(description="The VM (registered through ``tpm.enable``).")
    host: HostId = Field(description="Where to start it.")


class VmPlaced(Payload):
    """Policy started a VM on a host under a new placement epoch."""

    message_type = "vm.placed"

    vm_id: VmId = Field(description="The VM.")
    host: HostId = Field(description="Where it runs now.")
    epoch: int = Field(ge=1, description="Its new placement epoch.")


class StopMode(enum.StrEnum):
    """How to stop: ask the guest, or pull the plug."""

    SHUTDOWN = "shutdown"
    POWEROFF = "poweroff"


class StopVm(Payload):
    """Command to policy: stop this VM, keeping its final state, and remove it from its host."""

    message_type = "vm.stop"

    vm_id: VmId = Field(description="The VM.")
    mode: StopMode = Field(description="Guest shutdown, or power-off.")


class VmRetired(Payload):
    """Policy finished a stop: state retrieved (or loss recorded) and the domain removed."""

    message_type = "vm.retired"

    vm_id: VmId = Field(description="The VM.")
    host: HostId = Field(description="The host it was removed from.")
    retrieved: bool = Field(description="The final state was retrieved before the destroy.")


class StateLossRecorded(Payload):
    """Retrieval failed every attempt; the VM was destroyed anyway (invariant 7)."""

    message_type = "state.loss.recorded"

    vm_id: VmId = Field(description="The VM.")
    host: HostId = Field(description="The host it was on.")
    attempts: int = Field(ge=1, description="Retrieval attempts made.")
    last_persisted_age_s: float | None = Field(
        description="Age of the newest persisted version, None when nothing was ever stored."
    )
