"""What policy keeps of each snapshot with memory, beside the store's pin of its TPM and
NVRAM: the host whose disk holds the memory file, and libvirt's snapshot XML. libvirt
forgets a snapshot when its domain is undefined (every power-off through the keeper
undefines); the memory file stays on the host, and this record lets a revert redefine the
snapshot there, and a deletion find the file."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field
from redis.asyncio import Redis

from keeper_policy.storage.keys import memory_snapshots_key
from keeper_shared.messages.types import HostId
from keeper_shared.redis_access.results import awaited


class MemorySnapshot(BaseModel):
    """One snapshot with memory of a VM."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    snapshot_id: str = Field(description="Its name (the store's pin and libvirt's snapshot).")
    host: HostId = Field(description="The host whose disk holds the memory file.")
    snapshot_xml: str = Field(description="libvirt's XML of the snapshot (secure).")


class MemorySnapshots:
    """Redis access for the VMs' snapshots with memory."""

    def __init__(self, redis: Redis) -> None:
        self._redis = redis

    async def save(self, vm_id: str, snapshot: MemorySnapshot) -> None:
        """Keep (or replace) the record of a snapshot."""
        await awaited(
            self._redis.hset(
                memory_snapshots_key(vm_id), snapshot.snapshot_id, snapshot.model_dump_json()
            )
        )

    async def get(self, vm_id: str, snapshot_id: str) -> MemorySnapshot | None:
        """The snapshot with memory of that name, or None."""
        raw = await awaited(self._redis.hget(memory_snapshots_key(vm_id), snapshot_id))
        return MemorySnapshot.model_validate_json(raw) if raw else None

    async def all(self, vm_id: str) -> list[MemorySnapshot]:
        """Every snapshot with memory of the VM."""
        raw = await awaited(self._redis.hvals(memory_snapshots_key(vm_id)))
        return [MemorySnapshot.model_validate_json(record) for record in raw]

    async def forget(self, vm_id: str, snapshot_id: str) -> None:
        """Drop the record of one snapshot (its memory file was deleted)."""
        await awaited(self._redis.hdel(memory_snapshots_key(vm_id), snapshot_id))

    async def forget_vm(self, vm_id: str) -> None:
        """Drop every record of the VM (its stored state, pins included, is gone)."""
        await awaited(self._redis.delete(memory_snapshots_key(vm_id)))
