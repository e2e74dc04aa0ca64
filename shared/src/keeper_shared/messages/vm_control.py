"""Commands policy sends a host beyond the basic lifecycle: a new placement epoch for a
running domain (after a live migration), and pause / snapshot / resume for snapshots with
memory."""

from __future__ import annotations

from pydantic import Field

from keeper_shared.messages.envelope import Payload
from keeper_shared.messages.snapshot import SnapshotId
from keeper_shared.messages.types import VmId


class SetPlacementEpoch(Payload):
    """Command to a host: record this placement epoch in the running domain's metadata, so
    the state it announces from now on carries it. Never lowers an epoch.

    Replied with ``SetPlacementEpochReply``; asking for the epoch the domain already has is
    a no-op."""

    message_type = "vm.set-epoch"

    vm_id: VmId = Field(description="The VM.")
    epoch: int = Field(ge=1, description="Its new placement epoch.")


class SuspendVm(Payload):
    """Command to a host: pause the running domain (libvirt suspend); a paused domain stays
    paused. Replied with ``SuspendVmReply``."""

    message_type = "vm.suspend"

    vm_id: VmId = Field(description="The VM.")


class ResumeVm(Payload):
    """Command to a host: let a paused domain run again; a running one is left alone.
    Replied with ``ResumeVmReply``."""

    message_type = "vm.resume"

    vm_id: VmId = Field(description="The VM.")


class SnapshotDomain(Payload):
    """Command to a host: take a libvirt snapshot of the domain as it is (with its memory
    when it runs or is paused). Taking one that exists is a no-op. Replied with
    ``SnapshotDomainReply``."""

    message_type = "vm.snapshot-domain"

    vm_id: VmId = Field(description="The VM.")
    snapshot_id: SnapshotId = Field(description="The snapshot's name in libvirt.")
    description: str = Field(
        default="", max_length=512, description="Shown by libvirt (e.g. the pinned versions)."
    )


class DeleteDomainSnapshot(Payload):
    """Command to a host: delete a libvirt snapshot of the domain (its metadata and data);
    deleting one that does not exist is a no-op. Replied with
    ``DeleteDomainSnapshotReply``."""

    message_type = "vm.snapshot-domain-delete"

    vm_id: VmId = Field(description="The VM.")
    snapshot_id: SnapshotId = Field(description="The snapshot's name in libvirt.")
