"""Reading a VM's kept versions for ``state.history``: metadata, pins and scrubber flags.

Read-only, and never the bytes. A version is kept while it is in the last N (the history
list) or pinned by a snapshot; both are listed, marked which. Flags are whatever the
scrubber stored for a version in ``keeper:{vm}:<kind>:flags`` (a JSON object per version).
"""

from __future__ import annotations

import json

from pydantic import JsonValue
from redis.asyncio import Redis

from keeper_shared.messages.state import KindHistory, StateVersionInfo
from keeper_shared.messages.types import StateKind
from keeper_shared.redis_access.keys import (
    state_flags_key,
    state_head_key,
    state_history_key,
    state_meta_key,
    state_pinned_meta_key,
)
from keeper_state_store.storage.repository import VersionRecord
from keeper_state_store.storage.snapshots import SnapshotRecord


async def read_kind_history(
    redis: Redis, vm_id: str, kind: StateKind, snapshots: dict[str, SnapshotRecord]
) -> KindHistory:
    """Every kept version of one kind, oldest first."""
    pipe = redis.pipeline(transaction=False)
    pipe.hget(state_head_key(vm_id, kind), "version")
    pipe.lrange(state_history_key(vm_id, kind), 0, -1)
    pipe.hgetall(state_meta_key(vm_id, kind))
    pipe.hgetall(state_pinned_meta_key(vm_id, kind))
    pipe.hgetall(state_flags_key(vm_id, kind))
    head, history, metas, pinned_metas, flags = await pipe.execute()
    in_history = {int(version) for version in history}
    metas_by_version = {int(v): raw for v, raw in pinned_metas.items()}
    # The history's own copy wins where both hold a version (they are the same record).
    metas_by_version.update({int(v): raw for v, raw in metas.items()})
    versions = []
    for version in sorted(metas_by_version):
        record = VersionRecord.from_meta(version, metas_by_version[version])
        versions.append(
            StateVersionInfo(
                version=version,
                content_hash=record.content_hash,
                size=record.size,
                token=record.token,
                host=record.host or None,
                origin=record.origin,
                source_vm_id=record.source_vm_id,
                stored_at=record.stored_at,
                swtpm_version=record.swtpm_version,
                tpm_profile=record.tpm_profile,
                state_format_level=record.state_format_level,
                in_history=version in in_history,
                snapshots=[
                    name
                    for name, snapshot in snapshots.items()
                    if snapshot.versions.get(kind) == version
                ],
                flags=_flags(flags.get(str(version).encode())),
            )
        )
    return KindHistory(
        kind=kind, head_version=int(head) if head is not None else None, versions=versions
    )


def _flags(raw: bytes | None) -> dict[str, JsonValue]:
    """The scrubber's JSON object for a version; something unparsable is still a flag."""
    if raw is None:
        return {}
    try:
        value = json.loads(raw)
    except ValueError:
        return {"unreadable": True}
    return value if isinstance(value, dict) else {"value": value}
