"""Registered VMs as :class:`VmView`: the record policy keeps per VM and its placement.

Read-only. A record whose spec cannot be read (written by a release with another spec
schema) still shows, without its name and guest OS, so a listing never fails on one VM.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime

from pydantic import ValidationError
from redis.asyncio import Redis

from keeper_policy.storage.vm_registry import parse_placement
from keeper_shared.messages.queries import PersistedVersion, VmView
from keeper_shared.messages.tpm import VmSpec
from keeper_shared.messages.types import StateKind
from keeper_shared.redis_access.keys import PREFIX, placement_key, vm_record_key

_VM_RECORD = re.compile(rf"^{PREFIX}:\{{([0-9a-f-]{{36}})\}}:vm$")


async def registered_vm_ids(redis: Redis) -> list[str]:
    """Every VM with a record (policy keeps no index of them: a scan, as rare as a query)."""
    found = set()
    async for key in redis.scan_iter(match=vm_record_key("*"), count=500):
        match = _VM_RECORD.match(key.decode() if isinstance(key, bytes) else str(key))
        if match:
            found.add(match.group(1))
    return sorted(found)


async def read_vm_views(redis: Redis, vm_ids: list[str]) -> list[VmView]:
    """The views of those of ``vm_ids`` that are registered, by name and then id."""
    pipe = redis.pipeline(transaction=False)
    for vm_id in vm_ids:
        pipe.hgetall(vm_record_key(vm_id))
        pipe.hgetall(placement_key(vm_id))
    replies = iter(await pipe.execute())
    views = [
        view
        for vm_id, record, placement in zip(vm_ids, replies, replies, strict=True)
        if (view := vm_view(vm_id, record, placement)) is not None
    ]
    return sorted(views, key=lambda view: (view.name or "", view.vm_id))


async def vms_named(redis: Redis, reference: str) -> list[VmView]:
    """The VMs ``reference`` names: the one registered under that id, else every VM
    registered under that domain name."""
    try:
        vm_id = str(uuid.UUID(reference))
    except ValueError:
        vm_id = None
    if vm_id is not None:
        found = await read_vm_views(redis, [vm_id])
        if found:
            return found
    every = await read_vm_views(redis, await registered_vm_ids(redis))
    return [view for view in every if view.name == reference]


def vm_view(
    vm_id: str, record: Mapping[bytes, bytes], placement: Mapping[bytes, bytes]
) -> VmView | None:
    """The view of one VM from its record and placement hashes; None when not registered."""
    if not record:
        return None
    spec = _spec(record.get(b"spec"))
    where = parse_placement(dict(placement))
    return VmView(
        vm_id=vm_id,
        name=spec.name if spec else None,
        guest_os=spec.guest_os if spec else None,
        tpm_encrypted=spec.encrypt_tpm_state if spec else False,
        host=where.host,
        epoch=where.epoch,
        persisted=_persisted(record),
        last_host=_text(record.get(b"last_host")),
        lost_from=_text(record.get(b"lost_from")),
        tpm_stranded=_text(record.get(b"tpm_stranded")),
        tpm_reset=_text(record.get(b"tpm_reset")),
        tpm_reset_version=_number(record.get(b"tpm_reset_version")),
    )


def _spec(raw: bytes | None) -> VmSpec | None:
    if raw is None:
        return None
    try:
        return VmSpec.model_validate_json(raw)
    except ValidationError:
        return None


def _persisted(record: Mapping[bytes, bytes]) -> dict[StateKind, PersistedVersion]:
    """The recovery point per kind, as ``lua/persisted.lua`` records it."""
    found = {}
    for kind in StateKind:
        version = record.get(f"{kind.value}_version".encode())
        at = record.get(f"{kind.value}_persisted_at".encode())
        if version and at:
            found[kind] = PersistedVersion(
                version=int(version), persisted_at=datetime.fromtimestamp(float(at), UTC)
            )
    return found


def _number(value: bytes | None) -> int | None:
    return int(value) if value and value.isdigit() else None


def _text(value: bytes | None) -> str | None:
    return value.decode(errors="replace") if value else None
