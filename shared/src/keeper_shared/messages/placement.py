"""Placing, stopping and moving VMs: requests to policy and the facts it records."""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from keeper_shared.domain_document import MAX_DOMAIN_XML_CHARS
from keeper_shared.messages.envelope import Payload, register_upcaster
from keeper_shared.messages.snapshot import SnapshotId
from keeper_shared.messages.types import HostId, StateKind, VmId


class PlaceVm(Payload):
    """Command to policy: start this VM on this host with its newest state (or the versions
    or snapshot named)."""

    message_type = "vm.place"
    schema_version = 2

    vm_id: VmId = Field(description="The VM (registered through ``tpm.enable``).")
    host: HostId = Field(description="Where to start it.")
    override_version: bool = Field(
        default=False,
        description="Place it although the host's swtpm is older than the one that last ran "
        "the VM (an older swtpm may not read newer state).",
    )
    versions: dict[StateKind, Annotated[int, Field(ge=1)]] | None = Field(
        default=None, description="Stored version to start from per kind; newest otherwise."
    )
    snapshot_id: SnapshotId | None = Field(
        default=None, description="Start from the versions this snapshot pinned."
    )
    allow_older: bool = Field(
        default=False,
        description="Allow versions older than the newest stored (rolls the TPM back).",
    )
    domain_xml: str | None = Field(
        default=None,
        max_length=MAX_DOMAIN_XML_CHARS,
        description="The VM manager's own libvirt domain XML (disks, interfaces, devices, "
        "its metadata): policy checks it against the approved spec and TPM, adds the "
        "approved `<tpm>` when it has none, an `<nvram>` the host fills in and the placement "
        "epoch in `<metadata>`, keeps everything else as written, and keeps it for the VM's "
        "later starts. Refused with every reason when it conflicts. None: the definition "
        "kept from an earlier start, else policy's template from the spec.",
    )

    @model_validator(mode="after")
    def _one_choice(self) -> PlaceVm:
        if self.versions is not None and self.snapshot_id is not None:
            raise ValueError("versions and snapshot_id are mutually exclusive")
        return self


@register_upcaster(PlaceVm.message_type, 1)
def _place_vm_v1(data: dict[str, Any]) -> dict[str, Any]:
    """v1 predates ``domain_xml``: the definition kept, else the template, as before."""
    return data


class VmPlaced(Payload):
    """Policy started a VM on a host under a new placement epoch."""

    message_type = "vm.placed"

    vm_id: VmId = Field(description="The VM.")
    host: HostId = Field(description="Where it runs now.")
    epoch: int = Field(ge=1, description="Its new placement epoch.")
    swtpm_version: str | None = Field(
        default=None, description="The host's swtpm version, recorded as the VM's last."
    )
    version_overridden: str | None = Field(
        default=None,
        description="When ``override_version`` let an older swtpm run the VM: the refusal "
        "it skipped.",
    )


class StopMode(enum.StrEnum):
    """How to stop: ask the guest, or pull the plug."""

    SHUTDOWN = "shutdown"
    POWEROFF = "poweroff"


class StopTrigger(enum.StrEnum):
    """What started a stop workflow."""

    SHUTDOWN = "shutdown"
    """``vm.stop`` mode shutdown: the manager asked the guest to shut down."""
    POWEROFF = "poweroff"
    """``vm.stop`` mode poweroff: the manager pulled the plug."""
    GUEST_SHUTDOWN = "guest-shutdown"
    """The host reported the guest shut itself down (no ``vm.stop``)."""
    CRASHED = "crashed"
    """The host reported the domain crashed."""
    DESTROYED = "destroyed"
    """The host reported the domain destroyed by someone other than policy."""
    FOUND_STOPPED = "found-stopped"
    """The host found the domain off when it re-read libvirt (it was down, or libvirtd was),
    and libvirt did not say why."""


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
    trigger: StopTrigger = Field(default=StopTrigger.SHUTDOWN, description="What started the stop.")
    removed: bool = Field(
        default=True,
        description="The host confirmed the undefine; False leaves it to the clean-up the "
        "host gets when it next reports the VM.",
    )


class StateLossRecorded(Payload):
    """Retrieval failed every attempt; the VM was destroyed anyway (invariant 7)."""

    message_type = "state.loss.recorded"
    schema_version = 2

    vm_id: VmId = Field(description="The VM.")
    host: HostId = Field(description="The host it was on.")
    attempts: int = Field(
        ge=0, description="Retrieval attempts made (0 when the host was declared lost)."
    )
    last_persisted_age_s: float | None = Field(
        description="Age of the newest persisted version, None when nothing was ever stored."
    )
    versions: dict[StateKind, int] = Field(
        default_factory=dict, description="The newest persisted version of each kind."
    )
    trigger: StopTrigger | None = Field(default=None, description="What started the stop.")
    workflow_id: str | None = Field(
        default=None,
        max_length=64,
        description="The stop workflow; a replica resuming it may repeat this event.",
    )
    reason: str | None = Field(
        default=None,
        max_length=1024,
        description="Why nothing (more) could be retrieved: the last attempt's error, or the "
        "host being lost. None only in events of schema version 1.",
    )


@register_upcaster(StateLossRecorded.message_type, 1)
def _state_loss_v1(data: dict[str, Any]) -> dict[str, Any]:
    """v1 events predate ``reason``: they carry none."""
    return data


class RecoveryPoint(BaseModel):
    """What a VM would restart from: its newest persisted versions and how old they are."""

    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)

    vm_id: VmId = Field(description="The VM.")
    epoch: int = Field(ge=0, description="Its placement epoch on the lost host.")
    versions: dict[StateKind, int] = Field(description="Newest persisted version per kind.")
    last_persisted_at: datetime | None = Field(
        description="When the newest of them was persisted; None when nothing ever was."
    )
    age_s: float | None = Field(
        description="Seconds between that and the loss; None when nothing was persisted."
    )


class VmMigrated(Payload):
    """Policy moved a VM's placement after a live migration: new epoch on the destination,
    so the source's late writes are refused."""

    message_type = "vm.migrated"

    vm_id: VmId = Field(description="The VM.")
    source: HostId = Field(description="The host it left.")
    destination: HostId = Field(description="The host it runs on now.")
    epoch: int = Field(ge=1, description="Its new placement epoch.")


class VmEvicted(Payload):
    """A host that held a VM it no longer owns (lost and back, or a stop it never confirmed)
    removed it without its state being retrieved."""

    message_type = "vm.evicted"

    vm_id: VmId = Field(description="The VM.")
    host: HostId = Field(description="The host it was removed from.")
    placed_on: HostId | None = Field(description="Where the VM is placed now, if anywhere.")
