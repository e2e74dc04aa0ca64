"""Lost hosts: declared after missing heartbeats, and told to clean up when they return."""

from __future__ import annotations

from datetime import datetime

from pydantic import Field

from keeper_shared.messages.envelope import Payload
from keeper_shared.messages.placement import RecoveryPoint
from keeper_shared.messages.types import HostId, VmId


class HostLost(Payload):
    """Policy declared a host lost: it sent no heartbeat for ``silent_for_s``.

    Its VMs keep their placement (so the host may resume them if it comes back before they
    are placed elsewhere); placing one elsewhere raises its epoch, which fences the host."""

    message_type = "host.lost"

    host: HostId = Field(description="The lost host.")
    last_seen: datetime = Field(description="When policy last had a heartbeat from it (UTC).")
    silent_for_s: float = Field(ge=0, description="How long it had been silent.")
    vms: list[RecoveryPoint] = Field(description="The VMs placed on it, with recovery points.")


class HostReturned(Payload):
    """A host declared lost sends heartbeats again."""

    message_type = "host.returned"

    host: HostId = Field(description="The host.")
    lost_for_s: float = Field(ge=0, description="How long it was declared lost.")
    to_clean_up: list[VmId] = Field(
        description="VMs it still reports that are now placed elsewhere (or nowhere); each is "
        "removed without retrieving its state (``vm.evicted``)."
    )
