"""Handlers for a VM's kept versions: ``state.history`` and the snapshot commands."""

from __future__ import annotations

import structlog

from keeper_shared.bus.client import Delivery, Route
from keeper_shared.messages.envelope import Envelope
from keeper_shared.messages.replies import CreateSnapshotReply, DeleteSnapshotReply
from keeper_shared.messages.snapshot import (
    CreateSnapshot,
    DeleteSnapshot,
    ListSnapshots,
    SnapshotInfo,
    SnapshotList,
)
from keeper_shared.messages.state import ListStateHistory, StateHistory
from keeper_shared.messages.types import StateKind
from keeper_state_store.storage.history_listing import read_kind_history
from keeper_state_store.storage.repository import StateRepository
from keeper_state_store.storage.snapshots import SnapshotOutcome, SnapshotRecord, SnapshotStore

log = structlog.get_logger(__name__)


class HistoryService:
    """History and snapshots of one store replica."""

    def __init__(self, repository: StateRepository) -> None:
        self._redis = repository.redis
        self._snapshots = SnapshotStore(repository.redis, repository.replicas)

    def command_routes(self) -> list[Route]:
        """Routes of this service on the store's commands queue."""
        return [
            Route(ListStateHistory, self.on_history),
            Route(CreateSnapshot, self.on_snapshot_create),
            Route(DeleteSnapshot, self.on_snapshot_delete),
            Route(ListSnapshots, self.on_snapshot_list),
        ]

    async def on_history(
        self, envelope: Envelope[ListStateHistory], delivery: Delivery
    ) -> StateHistory:
        """Every kept version of each kind, with its pins and scrubber flags."""
        vm_id = envelope.data.vm_id
        snapshots = await self._snapshots.all(vm_id)
        kinds = [await read_kind_history(self._redis, vm_id, kind, snapshots) for kind in StateKind]
        return StateHistory(vm_id=vm_id, kinds=kinds)

    async def on_snapshot_create(
        self, envelope: Envelope[CreateSnapshot], delivery: Delivery
    ) -> CreateSnapshotReply:
        """Pin the newest versions under the snapshot's name (a repeat is a no-op)."""
        request = envelope.data
        result = await self._snapshots.create(request.vm_id, request.snapshot_id)
        if result.outcome is SnapshotOutcome.EMPTY:
            return CreateSnapshotReply.failed(f"VM {request.vm_id} has no stored state to pin")
        if result.outcome is SnapshotOutcome.MISSING:
            return CreateSnapshotReply.failed(
                f"newest {result.detail} of {request.vm_id} is not in Redis"
            )
        assert result.record is not None
        pinned = _describe(result.record)
        if result.outcome is SnapshotOutcome.CONFLICT:
            return CreateSnapshotReply.failed(
                f"snapshot {request.snapshot_id!r} of {request.vm_id} already pins other "
                f"versions ({pinned})",
            )
        if result.outcome is SnapshotOutcome.STORED:
            log.info("snapshot created", vm_id=request.vm_id, snapshot=request.snapshot_id)
        return CreateSnapshotReply(
            ok=True,
            versions=dict(result.record.versions),
            already_existed=result.outcome is SnapshotOutcome.DUPLICATE,
        )

    async def on_snapshot_delete(
        self, envelope: Envelope[DeleteSnapshot], delivery: Delivery
    ) -> DeleteSnapshotReply:
        """Drop the snapshot and unpin what only it pinned (deleting twice is fine)."""
        request = envelope.data
        result = await self._snapshots.delete(request.vm_id, request.snapshot_id)
        deleted = result.outcome is SnapshotOutcome.DELETED
        if deleted:
            log.info("snapshot deleted", vm_id=request.vm_id, snapshot=request.snapshot_id)
        return DeleteSnapshotReply(ok=True, deleted=deleted)

    async def on_snapshot_list(
        self, envelope: Envelope[ListSnapshots], delivery: Delivery
    ) -> SnapshotList:
        """The VM's snapshots, oldest first."""
        vm_id = envelope.data.vm_id
        snapshots = await self._snapshots.all(vm_id)
        return SnapshotList(
            vm_id=vm_id,
            snapshots=[
                SnapshotInfo(
                    snapshot_id=name, created_at=record.created_at, versions=record.versions
                )
                for name, record in snapshots.items()
            ],
        )


def _describe(record: SnapshotRecord) -> str:
    return ", ".join(f"{kind} v{version}" for kind, version in sorted(record.versions.items()))
