"""Snapshots of a VM as policy takes them: offline (the stored state), live without memory
(the newest persisted state, with its age), and with memory (paused, state retrieved while
frozen, libvirt snapshot, resumed: TPM and RAM agree)."""

from __future__ import annotations

import enum

from pydantic import Field

from keeper_shared.messages.envelope import Payload
from keeper_shared.messages.snapshot import SnapshotId
from keeper_shared.messages.types import HostId, StateKind, VmId


class SnapshotMode(enum.StrEnum):
    """What a snapshot holds."""

    OFFLINE = "offline"
    """The VM runs nowhere: its stored state is its whole state."""
    LIVE = "live"
    """Running, no memory: the newest persisted state, which may trail the running TPM."""
    MEMORY = "memory"
    """Running, with memory: paused while its state is retrieved, so TPM and RAM agree."""


class SnapshotVm(Payload):
    """Command to policy: snapshot this VM. Restoring is a ``vm.place`` with the
    ``snapshot_id`` (and ``allow_older``), which restores the pinned TPM and NVRAM; a
    snapshot with memory is gone back to with ``vm.revert``.

    Replied with ``SnapshotVmReply``: ``mode``, the pinned version per kind, and for a live
    snapshot ``persisted_age_s``."""

    message_type = "vm.snapshot"

    vm_id: VmId = Field(description="The VM.")
    snapshot_id: SnapshotId = Field(description="Name of the snapshot, unique per VM.")
    memory: bool = Field(
        default=False,
        description="Include the running VM's memory (pauses it briefly); ignored when the "
        "VM runs nowhere.",
    )


class VmSnapshotted(Payload):
    """Policy took a snapshot of a VM."""

    message_type = "vm.snapshotted"

    vm_id: VmId = Field(description="The VM.")
    snapshot_id: SnapshotId = Field(description="The snapshot.")
    mode: SnapshotMode = Field(description="What it holds.")
    versions: dict[StateKind, int] = Field(description="The pinned version of each kind.")
    persisted_age_s: float | None = Field(
        default=None,
        description="Live snapshots: how old the newest persisted version was (how far the "
        "pinned TPM may trail the running one). None for offline and memory snapshots.",
    )
    host: HostId | None = Field(default=None, description="Where the VM ran, if anywhere.")


class RevertVm(Payload):
    """Command to policy: go back to a snapshot with memory. A running VM is powered off
    first (its final state retrieved, as by ``vm.stop``); then the pinned TPM and NVRAM are
    put in place on the host that holds the snapshot's memory, the domain is defined under
    a new placement epoch, and libvirt reverts to the snapshot (redefined from the XML
    policy kept when an undefine dropped it): the guest runs on from the moment of the
    snapshot with the TPM it had then.

    Replied with ``RevertVmReply``: the host, the new epoch and the versions put back."""

    message_type = "vm.revert"

    vm_id: VmId = Field(description="The VM.")
    snapshot_id: SnapshotId = Field(description="A snapshot with memory of this VM.")


class DeleteVmSnapshot(Payload):
    """Command to policy: delete a snapshot of a VM. One with memory loses its libvirt
    snapshot and its memory file on the host that holds them (the guest's whole memory,
    keys the TPM released to it included) before the store unpins its versions; one
    without memory is the store's pin only. Deleting one that does not exist is not an
    error.

    Replied with ``DeleteVmSnapshotReply``."""

    message_type = "vm.snapshot-delete"

    vm_id: VmId = Field(description="The VM.")
    snapshot_id: SnapshotId = Field(description="The snapshot to delete.")
