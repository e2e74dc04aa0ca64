"""Commands policy sends a host beyond the basic lifecycle: a new placement epoch for a
running domain (after a live migration), pause / snapshot / resume for snapshots with
memory, and the revert of one."""

from __future__ import annotations

from pydantic import Field

from keeper_shared.domain_document import MAX_START_XML_CHARS
from keeper_shared.messages.envelope import Payload
from keeper_shared.messages.snapshot import SnapshotId
from keeper_shared.messages.types import VmId

MAX_SNAPSHOT_XML_CHARS = 2 * MAX_START_XML_CHARS
"""A libvirt snapshot's XML holds the domain twice (its live and its inactive definition)."""


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
    """Command to a host: take a libvirt snapshot of the domain as it is, with its memory
    (an external memory file in the host's snapshot directory) when it runs or is paused.
    Taking one that exists is a no-op. Replied with ``SnapshotDomainReply``, which carries
    the snapshot's libvirt XML (secure) that policy keeps so the snapshot can be redefined
    after the domain was undefined."""

    message_type = "vm.snapshot-domain"

    vm_id: VmId = Field(description="The VM.")
    snapshot_id: SnapshotId = Field(description="The snapshot's name in libvirt.")
    description: str = Field(
        default="", max_length=512, description="Shown by libvirt (e.g. the pinned versions)."
    )


class DeleteDomainSnapshot(Payload):
    """Command to a host: delete a snapshot of the domain, libvirt's record and the memory
    file the host keeps for it (also when the domain was undefined since); deleting one
    that does not exist is a no-op. Replied with
    ``DeleteDomainSnapshotReply``."""

    message_type = "vm.snapshot-domain-delete"

    vm_id: VmId = Field(description="The VM.")
    snapshot_id: SnapshotId = Field(description="The snapshot's name in libvirt.")


class RevertDomain(Payload):
    """Command to a host: define the domain from this XML (the VM's start XML under its new
    placement epoch), give it back the snapshot from ``snapshot_xml`` when libvirt lost it
    (an undefine drops snapshot metadata), and revert to that snapshot, memory included:
    the guest runs on where it was, on the TPM and NVRAM the store has just put in place.
    The domain must be off. Replied with ``RevertDomainReply``."""

    message_type = "vm.revert-domain"

    vm_id: VmId = Field(description="The VM; must match the XML's UUID.")
    epoch: int = Field(ge=1, description="The placement epoch, recorded in domain metadata.")
    domain_xml: str = Field(max_length=MAX_START_XML_CHARS, description="The libvirt domain XML.")
    snapshot_id: SnapshotId = Field(description="The snapshot's name in libvirt.")
    snapshot_xml: str = Field(
        max_length=MAX_SNAPSHOT_XML_CHARS,
        description="The snapshot's XML as the host reported it when taking it.",
    )
