"""Queries: what operators' tools ask policy and the store to show them.

A service's Redis schema is its own; tools that show VMs, hosts or stored state ask the
service that keeps them, over the bus, and get typed views back. Each query is a command on
the owning service's commands queue and only reads, so asking again is always safe.
"""

from __future__ import annotations

import enum
from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field

from keeper_shared.messages.envelope import Payload
from keeper_shared.messages.host import HostCapabilities
from keeper_shared.messages.types import HostId, StateKind, VmId, VmName

MAX_DESCRIBED_VMS = 1000
"""VMs one :class:`DescribeStoredState` may ask about; a caller with more sends several
(the reply stays far below the bus's message size limit)."""


class _View(BaseModel):
    """Base of the views inside a reply: frozen, and strict about unknown fields."""

    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)


class ListVms(Payload):
    """Query to policy: the registered VMs, or the ones a reference names. Replied with
    :class:`VmsListed`."""

    message_type = "vms.list"

    vm: VmName | None = Field(
        default=None,
        description="A VM id (the VM registered under it) or a domain name (every VM "
        "registered under that name; several may share one); None lists every registered VM.",
    )


class PersistedVersion(_View):
    """The newest version of one kind policy heard was persisted (``state.persisted``)."""

    version: int = Field(ge=1, description="Its number.")
    persisted_at: datetime = Field(description="When the store announced it (UTC).")


class VmView(_View):
    """One registered VM as policy keeps it."""

    vm_id: VmId = Field(description="The VM.")
    name: VmName | None = Field(
        description="Its libvirt domain name; None when the registered spec cannot be read."
    )
    guest_os: str | None = Field(
        max_length=64, description="The guest OS it was registered with; None when unreadable."
    )
    tpm_encrypted: bool = Field(
        description="swtpm encrypts its TPM state with a per-VM libvirt secret the keeper keeps."
    )
    host: HostId | None = Field(description="The host it is placed on; None when stopped.")
    epoch: int = Field(ge=0, description="Its placement epoch (0 before its first start).")
    persisted: dict[StateKind, PersistedVersion] = Field(
        description="Per kind, the newest persisted version policy heard of (its recovery "
        "point); a kind never persisted is absent."
    )
    last_host: HostId | None = Field(description="The host it was last placed on.")
    lost_from: HostId | None = Field(
        description="Set while its host is declared lost and it was not placed elsewhere yet."
    )
    tpm_stranded: str | None = Field(
        max_length=1024,
        description="Why its TPM state cannot be used off its host (encrypted with a secret "
        "the keeper cannot read); None when it can.",
    )
    tpm_reset: str | None = Field(
        default=None,
        max_length=1024,
        description="Set while its stored TPM was replaced unasked (``state.tpm.reset``) and "
        "nobody accepted the new one: what happened and which version is restored.",
    )
    tpm_reset_version: int | None = Field(
        default=None, ge=1, description="The first TPM version of the unaccepted new TPM."
    )


class VmsListed(Payload):
    """Reply to :class:`ListVms`."""

    message_type = "vms.listed"

    vms: list[VmView] = Field(description="The VMs found, by name and then id.")


class ListHosts(Payload):
    """Query to policy: every host that ever sent a heartbeat. Replied with
    :class:`HostsListed`."""

    message_type = "hosts.list"


class Liveness(enum.StrEnum):
    """Whether policy hears from a host."""

    ALIVE = "alive"
    """Its last heartbeat is recent."""
    SILENT = "silent"
    """No heartbeat for longer than policy's loss bound, and not declared lost yet."""
    LOST = "lost"
    """Declared lost: its VMs were fenced off it."""


class HostView(_View):
    """One host as policy last heard from it."""

    host: HostId = Field(description="The host.")
    liveness: Liveness = Field(description="Alive, silent or lost, by policy's rule.")
    last_seen: datetime = Field(description="When its last heartbeat arrived (UTC).")
    lost_at: datetime | None = Field(
        description="When policy declared it lost (UTC); None unless it is lost."
    )
    cluster: str = Field(max_length=63, description="The cluster it belongs to.")
    capabilities: HostCapabilities = Field(description="What it reported it can run.")
    vms: int = Field(ge=0, description="How many VMs its last heartbeat listed.")
    heartbeat_interval_s: float = Field(gt=0, description="How often it sends heartbeats.")


class HostsListed(Payload):
    """Reply to :class:`ListHosts`."""

    message_type = "hosts.listed"

    lost_after_s: float = Field(
        gt=0, description="Silence after which policy declares a host lost (its setting)."
    )
    hosts: list[HostView] = Field(description="Every host, by id.")


class DescribeStoredState(Payload):
    """Query to the store: the newest stored version of each kind of these VMs. Replied
    with :class:`StoredStateDescribed`."""

    message_type = "state.describe"

    vm_ids: list[VmId] = Field(
        max_length=MAX_DESCRIBED_VMS, description="The VMs, registered or not."
    )


class NewestVersion(_View):
    """The newest stored version of one kind."""

    version: int = Field(ge=1, description="Its number.")
    stored_at: datetime | None = Field(
        description="When the store wrote it (UTC); None when its metadata is unreadable."
    )
    size: int | None = Field(
        ge=0, description="Its uncompressed size in bytes; None when its metadata is unreadable."
    )


class StoredVmState(_View):
    """What the store holds for one VM."""

    vm_id: VmId = Field(description="The VM.")
    has_data_key: bool = Field(
        description="The store keeps a data key for it (it has, or had, stored state)."
    )
    newest: dict[StateKind, NewestVersion] = Field(
        description="Per kind, its newest stored version; a kind with none stored is absent."
    )


class StoredStateDescribed(Payload):
    """Reply to :class:`DescribeStoredState`."""

    message_type = "state.described"

    vms: list[StoredVmState] = Field(description="One entry per VM asked about, in order.")
