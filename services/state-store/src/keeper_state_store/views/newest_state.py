"""The newest stored version of each kind of many VMs, with when it was written and its
size: heads and their metadata, never the bytes."""

from __future__ import annotations

from redis.asyncio import Redis

from keeper_shared.messages.queries import NewestVersion, StoredVmState
from keeper_shared.messages.types import StateKind
from keeper_shared.redis_access.keys import data_key_key, state_head_key, state_meta_key
from keeper_state_store.storage.version_meta import VersionMetaError, unpack_version_meta


async def read_stored_state(redis: Redis, vm_ids: list[str]) -> list[StoredVmState]:
    """What the store holds for each of ``vm_ids``, in order, in two round trips."""
    pipe = redis.pipeline(transaction=False)
    for vm_id in vm_ids:
        pipe.exists(data_key_key(vm_id))
        for kind in StateKind:
            pipe.hget(state_head_key(vm_id, kind), "version")
    replies = iter(await pipe.execute())
    has_key: dict[str, bool] = {}
    heads: list[tuple[str, StateKind, int]] = []
    for vm_id in vm_ids:
        has_key[vm_id] = bool(next(replies))
        for kind in StateKind:
            head = next(replies)
            if head is not None:
                heads.append((vm_id, kind, int(head)))

    pipe = redis.pipeline(transaction=False)
    for vm_id, kind, version in heads:
        pipe.hget(state_meta_key(vm_id, kind), str(version))
    metas = await pipe.execute() if heads else []
    newest: dict[str, dict[StateKind, NewestVersion]] = {vm_id: {} for vm_id in vm_ids}
    for (vm_id, kind, version), meta in zip(heads, metas, strict=True):
        newest[vm_id][kind] = newest_version(version, meta)
    return [
        StoredVmState(vm_id=vm_id, has_data_key=has_key[vm_id], newest=newest[vm_id])
        for vm_id in vm_ids
    ]


def newest_version(version: int, meta: bytes | None) -> NewestVersion:
    """A head's version with what its metadata says; a missing or malformed record still
    shows the version (the scrubber reports the record itself)."""
    if meta is not None:
        try:
            unpacked = unpack_version_meta(bytes(meta))
        except VersionMetaError:
            pass
        else:
            return NewestVersion(version=version, stored_at=unpacked.stored_at, size=unpacked.size)
    return NewestVersion(version=version, stored_at=None, size=None)
