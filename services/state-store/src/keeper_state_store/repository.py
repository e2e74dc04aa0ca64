"""The store's Redis schema: fenced version writes, heads, versions and per-VM data keys.

Every write goes through one Lua script so the fencing check, the version record, the head
and the history trim land together or not at all. Redis only ever sees ciphertext.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from typing import cast

from redis.asyncio import Redis

from keeper_shared.encryption import (
    DataKey,
    KeyEncryptionKey,
    WrappedKey,
    new_data_key,
    unwrap_data_key,
    wrap_data_key,
)
from keeper_shared.messages.types import FencingToken, StateKind
from keeper_shared.redis_keys import (
    data_key_key,
    placement_key,
    state_blobs_key,
    state_head_key,
    state_history_key,
    state_meta_key,
)
from keeper_shared.redis_results import awaited


class WriteOutcome(enum.StrEnum):
    """What the fenced write did."""

    STORED = "stored"
    DUPLICATE = "duplicate"
    STALE = "stale"
    WRONG_HOST = "wrong_host"
    STALE_EPOCH = "stale_epoch"


@dataclass(frozen=True)
class WriteResult:
    """Outcome of a fenced write and its detail (version, or the placement that refused)."""

    outcome: WriteOutcome
    detail: str


@dataclass(frozen=True)
class VersionRecord:
    """Metadata of one stored version (everything but the bytes)."""

    version: int
    content_hash: str
    size: int
    token: FencingToken
    host: str
    stored_at: datetime


@dataclass(frozen=True)
class Placement:
    """Where a VM may run, and under which epoch."""

    host: str
    epoch: int


class StateRepository:
    """Redis access for the state store."""

    def __init__(self, redis: Redis, kek: KeyEncryptionKey, *, history_depth: int) -> None:
        self._redis = redis
        self._kek = kek
        self._history_depth = history_depth
        script = resources.files(__package__).joinpath("persist.lua").read_text()
        self._persist = redis.register_script(script)

    async def placement(self, vm_id: str) -> Placement | None:
        """The VM's current placement, None if it was never placed."""
        values = await awaited(self._redis.hmget(placement_key(vm_id), ["host", "epoch"]))
        host, epoch = values
        if host is None or epoch is None:
            return None
        return Placement(host=host.decode(), epoch=int(epoch))

    async def data_key(self, vm_id: str) -> DataKey:
        """The VM's data key, created on first use. Two replicas racing agree on one key:
        only the first SET NX wins and both read back the winner."""
        key = data_key_key(vm_id)
        stored = await awaited(self._redis.get(key))
        if stored is None:
            candidate = wrap_data_key(self._kek, new_data_key())
            await awaited(self._redis.set(key, candidate.to_bytes(), nx=True))
            stored = await awaited(self._redis.get(key))
            if stored is None:
                raise RuntimeError(f"data key of {vm_id} vanished right after it was written")
        return unwrap_data_key(self._kek, WrappedKey.from_bytes(stored))

    async def head_hash(self, vm_id: str, kind: StateKind) -> str | None:
        """Hash of the newest stored version, None when nothing is stored."""
        value = await awaited(self._redis.hget(state_head_key(vm_id, kind), "hash"))
        # The client returns bytes (no decode_responses); redis-py's annotation says str.
        return bytes(cast(bytes, value)).decode() if value is not None else None

    async def head_version(self, vm_id: str, kind: StateKind) -> int | None:
        """Number of the newest stored version, None when nothing is stored."""
        value = await awaited(self._redis.hget(state_head_key(vm_id, kind), "version"))
        return int(value) if value is not None else None

    async def write_version(
        self,
        *,
        vm_id: str,
        kind: StateKind,
        host: str,
        token: FencingToken,
        content_hash: str,
        size: int,
        sealed: bytes,
    ) -> WriteResult:
        """Fenced compare-and-set of a new version (see persist.lua)."""
        meta = json.dumps(
            {
                "hash": content_hash,
                "size": size,
                "epoch": token.epoch,
                "generation": token.generation,
                "host": host,
                "stored_at": datetime.now(UTC).isoformat(),
            }
        )
        keys = [
            placement_key(vm_id),
            state_head_key(vm_id, kind),
            state_blobs_key(vm_id, kind),
            state_meta_key(vm_id, kind),
            state_history_key(vm_id, kind),
        ]
        args: list[bytes | str | int] = [
            host,
            token.epoch,
            token.generation,
            content_hash,
            sealed,
            meta,
            self._history_depth,
        ]
        outcome, detail = await self._persist(keys=keys, args=args)
        return WriteResult(WriteOutcome(outcome.decode()), detail.decode())

    async def read_version(
        self, vm_id: str, kind: StateKind, version: int
    ) -> tuple[VersionRecord, bytes] | None:
        """A stored version's metadata and its sealed bytes, None when it is not kept."""
        pipe = self._redis.pipeline(transaction=False)
        pipe.hget(state_meta_key(vm_id, kind), str(version))
        pipe.hget(state_blobs_key(vm_id, kind), str(version))
        meta_raw, sealed = await pipe.execute()
        if meta_raw is None or sealed is None:
            return None
        meta = json.loads(meta_raw)
        record = VersionRecord(
            version=version,
            content_hash=meta["hash"],
            size=meta["size"],
            token=FencingToken(epoch=meta["epoch"], generation=meta["generation"]),
            host=meta["host"],
            stored_at=datetime.fromisoformat(meta["stored_at"]),
        )
        return record, bytes(sealed)
