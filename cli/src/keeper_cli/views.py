"""Read-only views of what policy and the store keep in Redis, for ``status`` and
``hosts`` (there is no query command for them on the bus).

Everything here only reads, and tolerates records written by older or newer services:
a field it does not know is ignored, a field that is missing shows as unknown.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any, cast

from redis.asyncio import Redis

from keeper_shared.messages.types import StateKind
from keeper_shared.redis_access.keys import (
    PREFIX,
    data_key_key,
    hosts_key,
    placement_key,
    state_head_key,
    state_meta_key,
    vm_record_key,
)
from keeper_shared.redis_access.results import awaited
from keeper_state_store.storage.version_meta import VersionMetaError, unpack_version_meta

HOST_STATUS_KEY = f"{PREFIX}:policy:host-status"
"""Policy's hash of host liveness: `alive:<last_seen>` or `lost:<declared_at>:<last_seen>`."""

_VM_RECORD = re.compile(rf"^{PREFIX}:\{{([0-9a-f-]{{36}})\}}:vm$")


@dataclass(frozen=True)
class KindStatus:
    """The newest stored version of one kind."""

    version: int | None
    stored_at: float | None
    size: int | None

    def age_s(self, now: float) -> float | None:
        return None if self.stored_at is None else max(0.0, now - self.stored_at)


@dataclass(frozen=True)
class VmStatus:
    """One VM as policy and the store see it."""

    vm_id: str
    name: str | None
    guest_os: str | None
    host: str | None
    epoch: int
    kinds: dict[str, KindStatus]
    lost_from: str | None = None
    last_host: str | None = None
    tpm_encrypted: bool = False
    """swtpm encrypts the TPM state with the VM's libvirt secret (``--encrypt-state``)."""
    tpm_stranded: str | None = None
    """Why the TPM state cannot be used off its host (a secret the keeper cannot read)."""

    def newest_stored_at(self) -> float | None:
        times = [k.stored_at for k in self.kinds.values() if k.stored_at is not None]
        return max(times) if times else None

    def protection(self) -> str:
        """`protected` (state stored), `unprotected` (nothing stored yet), `loss-recorded`
        (a stop could not retrieve the final state), `stranded` (stored, but encrypted with
        a secret the keeper cannot read: useless on another host)."""
        if self.lost_from:
            return "loss-recorded"
        if self.tpm_stranded:
            return "stranded"
        if any(k.version is not None for k in self.kinds.values()):
            return "protected"
        return "unprotected"

    def as_json(self, now: float) -> dict[str, Any]:
        newest = self.newest_stored_at()
        return {
            "vm_id": self.vm_id,
            "name": self.name,
            "guest_os": self.guest_os,
            "host": self.host,
            "running": self.host is not None,
            "epoch": self.epoch,
            "protection": self.protection(),
            "newest_persisted_at": iso(newest),
            "newest_persisted_age_s": None if newest is None else round(now - newest, 1),
            "state": {
                kind: {
                    "version": status.version,
                    "persisted_at": iso(status.stored_at),
                    "age_s": None if status.stored_at is None else round(now - status.stored_at, 1),
                    "size": status.size,
                }
                for kind, status in self.kinds.items()
            },
            "lost_from": self.lost_from,
            "last_host": self.last_host,
            "tpm_encrypted": self.tpm_encrypted,
            "tpm_stranded": self.tpm_stranded,
        }


@dataclass(frozen=True)
class HostStatus:
    """One host as policy last heard from it."""

    host: str
    status: str
    last_seen: float | None
    cluster: str | None
    capabilities: dict[str, Any] = field(default_factory=dict)
    vms: int = 0

    def as_json(self, now: float) -> dict[str, Any]:
        data = asdict(self)
        data["last_seen"] = iso(self.last_seen)
        data["last_seen_age_s"] = None if self.last_seen is None else round(now - self.last_seen, 1)
        return data


def iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return datetime.fromtimestamp(timestamp).astimezone().isoformat(timespec="seconds")


def _text(value: bytes | None) -> str | None:
    if value is None or value == b"":
        return None
    return value.decode(errors="replace")


async def vm_ids(redis: Redis) -> list[str]:
    """Every VM policy registered."""
    found = set()
    async for key in redis.scan_iter(match=f"{PREFIX}:{{*}}:vm", count=500):
        match = _VM_RECORD.match(key.decode() if isinstance(key, bytes) else str(key))
        if match:
            found.add(match.group(1))
    return sorted(found)


async def vm_status(redis: Redis, vm_id: str) -> VmStatus | None:
    """One VM, None when policy never registered it."""
    pipe = redis.pipeline(transaction=False)
    pipe.hgetall(vm_record_key(vm_id))
    pipe.hgetall(placement_key(vm_id))
    for kind in StateKind:
        pipe.hgetall(state_head_key(vm_id, kind))
    record, placement, *heads = await pipe.execute()
    if not record:
        return None
    name = guest_os = None
    encrypted = False
    try:
        spec = json.loads(record.get(b"spec", b"{}"))
        name, guest_os = spec.get("name"), spec.get("guest_os")
        encrypted = spec.get("encrypt_tpm_state") is True
    except ValueError:
        pass
    kinds: dict[str, KindStatus] = {}
    for kind, head in zip(StateKind, heads, strict=True):
        version = int(head[b"version"]) if head.get(b"version") else None
        stored_at = size = None
        if version is not None:
            meta_raw = await awaited(redis.hget(state_meta_key(vm_id, kind), str(version)))
            if meta_raw:
                try:
                    # The client returns bytes; redis-py's annotation says str.
                    meta = unpack_version_meta(bytes(cast(bytes, meta_raw)))
                    stored_at, size = meta.stored_at.timestamp(), meta.size
                except VersionMetaError:
                    pass
            if stored_at is None and record.get(f"{kind.value}_persisted_at".encode()):
                stored_at = float(record[f"{kind.value}_persisted_at".encode()])
        kinds[kind.value] = KindStatus(version=version, stored_at=stored_at, size=size)
    return VmStatus(
        vm_id=vm_id,
        name=name,
        guest_os=guest_os,
        host=_text(placement.get(b"host")),
        epoch=int(placement.get(b"epoch", 0) or 0),
        kinds=kinds,
        lost_from=_text(record.get(b"lost_from")),
        last_host=_text(record.get(b"last_host")),
        tpm_encrypted=encrypted,
        tpm_stranded=_text(record.get(b"tpm_stranded")),
    )


async def all_vm_status(redis: Redis) -> list[VmStatus]:
    """Every registered VM, by name."""
    found = [status for vm_id in await vm_ids(redis) if (status := await vm_status(redis, vm_id))]
    return sorted(found, key=lambda s: (s.name or "", s.vm_id))


async def resolve_vm(redis: Redis, reference: str) -> list[str]:
    """The ids of the VMs ``reference`` names (a VM id, or a domain name, which several
    VMs may share); empty when none. A VM id also names a VM that is not registered but has
    stored state (imported or cloned for a VM to be registered later)."""
    lowered = reference.lower()
    if re.fullmatch(r"[0-9a-f-]{36}", lowered) and await awaited(
        redis.exists(vm_record_key(lowered), data_key_key(lowered))
    ):
        return [lowered]
    return [s.vm_id for s in await all_vm_status(redis) if s.name == reference]


async def host_statuses(redis: Redis, *, lost_after_s: float) -> list[HostStatus]:
    """Every host that ever sent a heartbeat: alive, silent (no heartbeat for a while,
    not yet declared lost) or lost."""
    pipe = redis.pipeline(transaction=False)
    pipe.hgetall(hosts_key())
    pipe.hgetall(HOST_STATUS_KEY)
    records, statuses = await pipe.execute()
    now = time.time()
    hosts = []
    for raw_host, raw in sorted(records.items()):
        host = raw_host.decode()
        try:
            record = json.loads(raw)
        except ValueError:
            record = {}
        last_seen = record.get("last_seen")
        last_seen = float(last_seen) if isinstance(last_seen, int | float) else None
        marker = (_text(statuses.get(raw_host)) or "").split(":", 1)[0]
        if marker == "lost":
            status = "lost"
        elif last_seen is not None and now - last_seen > lost_after_s:
            status = "silent"
        else:
            status = "alive"
        vms = record.get("vms", {})
        hosts.append(
            HostStatus(
                host=host,
                status=status,
                last_seen=last_seen,
                cluster=record.get("cluster"),
                capabilities=dict(record.get("capabilities") or {}),
                vms=len(vms) if isinstance(vms, dict | list) else 0,
            )
        )
    return hosts
