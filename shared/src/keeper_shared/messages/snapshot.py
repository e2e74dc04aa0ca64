"""Snapshots: named sets of stored versions that history trimming never drops.

All three commands go to the state store. A snapshot pins the newest version of each kind
the VM has when it is created; restoring it is a ``state.restore`` with its id.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from keeper_shared.messages.envelope import Payload
from keeper_shared.messages.types import StateKind, VmId

SNAPSHOT_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
"""Short and plain: snapshot ids are shown to people and become Redis hash fields."""

SnapshotId = Annotated[str, Field(pattern=SNAPSHOT_ID_PATTERN)]


class CreateSnapshot(Payload):
    """Command to the store: pin the newest stored version of each kind under a name.

    Replied with ``CreateSnapshotReply``: each pinned kind's version. Creating
    the same snapshot again is a no-op while the newest versions are still the pinned ones,
    and refused once they differ (a name stands for one set of versions)."""

    message_type = "snapshot.create"

    vm_id: VmId = Field(description="The VM.")
    snapshot_id: SnapshotId = Field(description="Name of the snapshot, unique per VM.")


class DeleteSnapshot(Payload):
    """Command to the store: drop a snapshot and unpin the versions no other snapshot uses.

    Replied with ``DeleteSnapshotReply``; ``deleted`` is false when there was no such
    snapshot (a repeated delete is not an error)."""

    message_type = "snapshot.delete"

    vm_id: VmId = Field(description="The VM.")
    snapshot_id: SnapshotId = Field(description="Name of the snapshot to delete.")


class ListSnapshots(Payload):
    """Command to the store: list a VM's snapshots. Replied with :class:`SnapshotList`."""

    message_type = "snapshot.list"

    vm_id: VmId = Field(description="The VM.")


class SnapshotInfo(BaseModel):
    """One snapshot inside a :class:`SnapshotList`."""

    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)

    snapshot_id: SnapshotId = Field(description="Its name.")
    created_at: datetime = Field(description="When the store pinned it (UTC).")
    versions: dict[StateKind, Annotated[int, Field(ge=1)]] = Field(
        description="The pinned version of each kind the VM had then."
    )


class SnapshotList(Payload):
    """Reply to :class:`ListSnapshots`."""

    message_type = "snapshot.listed"

    vm_id: VmId = Field(description="The VM.")
    snapshots: list[SnapshotInfo] = Field(description="Its snapshots, oldest first.")
