"""Snapshots in Redis: which versions each one pins, and the pinned copies themselves.

Pinning copies a version's sealed blob and metadata into per-kind pinned hashes, so the
history trim in persist.lua stays a plain "drop the oldest" and can never drop what a
snapshot needs. The copies are the same ciphertext (same AAD), so they decrypt as before.
Creating and deleting are Lua scripts: the record and its pins change together.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources

from redis.asyncio import Redis

from keeper_shared.messages.types import StateKind
from keeper_shared.redis_access.keys import (
    snapshots_key,
    state_blobs_key,
    state_head_key,
    state_meta_key,
    state_pinned_blobs_key,
    state_pinned_meta_key,
)
from keeper_shared.redis_access.results import awaited
from keeper_state_store.storage.replication import NO_REPLICAS, ReplicaQuorum, run_replicated


class SnapshotOutcome(enum.StrEnum):
    """What a create or delete did."""

    STORED = "stored"
    DUPLICATE = "duplicate"
    """The snapshot exists and pins exactly the current newest versions."""
    CONFLICT = "conflict"
    """The snapshot exists and pins other versions; nothing changed."""
    EMPTY = "empty"
    """The VM has no stored state to pin."""
    MISSING = "missing"
    """A newest version's blob is not in Redis (should not happen; nothing changed)."""
    DELETED = "deleted"
    ABSENT = "absent"
    """There was no such snapshot to delete."""


@dataclass(frozen=True)
class SnapshotRecord:
    """A snapshot as stored: when, and which version of each kind."""

    created_at: datetime
    versions: dict[StateKind, int]

    @classmethod
    def from_json(cls, raw: bytes | str) -> SnapshotRecord:
        """Parse the JSON the Lua scripts store (Lua numbers may come back as 3.0)."""
        data = json.loads(raw)
        return cls(
            created_at=datetime.fromisoformat(data["created_at"]),
            versions={StateKind(kind): int(version) for kind, version in data["versions"].items()},
        )


@dataclass(frozen=True)
class SnapshotResult:
    """Outcome of a create or delete, and the snapshot record it concerns (if any)."""

    outcome: SnapshotOutcome
    record: SnapshotRecord | None
    detail: str = ""


class SnapshotStore:
    """Redis access for snapshots."""

    def __init__(self, redis: Redis, replicas: ReplicaQuorum = NO_REPLICAS) -> None:
        self._redis = redis
        self._replicas = replicas
        scripts = resources.files(__package__)
        self._create = redis.register_script(scripts.joinpath("snapshot_create.lua").read_text())
        self._delete = redis.register_script(scripts.joinpath("snapshot_delete.lua").read_text())

    async def create(self, vm_id: str, snapshot_id: str) -> SnapshotResult:
        """Pin the newest version of each kind under ``snapshot_id``, returned once the
        replicas hold the pin (NotReplicatedError when they do not in time)."""
        keys = [snapshots_key(vm_id)]
        for kind in StateKind:
            keys += [
                state_head_key(vm_id, kind),
                state_blobs_key(vm_id, kind),
                state_meta_key(vm_id, kind),
                state_pinned_blobs_key(vm_id, kind),
                state_pinned_meta_key(vm_id, kind),
            ]
        args = [snapshot_id, datetime.now(UTC).isoformat(), *(kind.value for kind in StateKind)]
        (result,) = await run_replicated(
            self._redis,
            self._replicas,
            lambda pipe: self._create(keys=keys, args=args, client=pipe),
        )
        return self._result(result)

    async def delete(self, vm_id: str, snapshot_id: str) -> SnapshotResult:
        """Drop ``snapshot_id``; unpin its versions unless another snapshot pins them."""
        keys = [snapshots_key(vm_id)]
        for kind in StateKind:
            keys += [state_pinned_blobs_key(vm_id, kind), state_pinned_meta_key(vm_id, kind)]
        args = [snapshot_id, *(kind.value for kind in StateKind)]
        return self._result(await self._delete(keys=keys, args=args))

    async def get(self, vm_id: str, snapshot_id: str) -> SnapshotRecord | None:
        """One snapshot, None when the VM has no snapshot of that id."""
        raw = await awaited(self._redis.hget(snapshots_key(vm_id), snapshot_id))
        return SnapshotRecord.from_json(raw) if raw is not None else None

    async def all(self, vm_id: str) -> dict[str, SnapshotRecord]:
        """Every snapshot of the VM by id, oldest first."""
        raw: dict[bytes, bytes] = await awaited(self._redis.hgetall(snapshots_key(vm_id)))
        records = {name.decode(): SnapshotRecord.from_json(value) for name, value in raw.items()}
        return dict(sorted(records.items(), key=lambda item: (item[1].created_at, item[0])))

    @staticmethod
    def _result(reply: list[bytes]) -> SnapshotResult:
        outcome = SnapshotOutcome(reply[0].decode())
        detail = reply[1].decode()
        if outcome in (SnapshotOutcome.EMPTY, SnapshotOutcome.MISSING, SnapshotOutcome.ABSENT):
            return SnapshotResult(outcome, None, detail)
        return SnapshotResult(outcome, SnapshotRecord.from_json(detail))
