"""Policy's records in Redis: registered VMs, placements (epochs) and host heartbeats.

The placement hash is also what the store's fencing script reads, so raising the epoch here
is what fences a host the VM has left.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

from redis.asyncio import Redis

from keeper_shared.messages.host import HostCapabilities, HostHeartbeat
from keeper_shared.messages.tpm import VmSpec
from keeper_shared.redis_keys import hosts_key, placement_key, vm_record_key
from keeper_shared.redis_results import awaited


class UnknownVmError(LookupError):
    """The VM was never registered through ``tpm.enable``."""


@dataclass(frozen=True)
class VmRecord:
    """A registered VM."""

    spec: VmSpec
    tpm_xml: str
    host: str | None
    epoch: int
    last_persisted_at: float | None


@dataclass(frozen=True)
class HostRecord:
    """A host as its last heartbeat showed it."""

    host: str
    capabilities: HostCapabilities
    last_seen: float


class PolicyRegistry:
    """Redis access for policy."""

    def __init__(self, redis: Redis) -> None:
        self._redis = redis

    async def register_vm(self, spec: VmSpec, tpm_xml: str) -> None:
        """Record an approved VM (idempotent)."""
        await awaited(
            self._redis.hset(
                vm_record_key(spec.vm_id),
                mapping={"spec": spec.model_dump_json(), "tpm_xml": tpm_xml},
            )
        )

    async def vm(self, vm_id: str) -> VmRecord:
        """A registered VM with its placement; UnknownVmError if never registered."""
        pipe = self._redis.pipeline(transaction=False)
        pipe.hgetall(vm_record_key(vm_id))
        pipe.hgetall(placement_key(vm_id))
        record, placement = await pipe.execute()
        if not record:
            raise UnknownVmError(f"VM {vm_id} is not registered (enable its TPM first)")
        host = placement.get(b"host", b"").decode() or None
        persisted = record.get(b"last_persisted_at")
        return VmRecord(
            spec=VmSpec.model_validate_json(record[b"spec"]),
            tpm_xml=record[b"tpm_xml"].decode(),
            host=host,
            epoch=int(placement.get(b"epoch", 0)),
            last_persisted_at=float(persisted) if persisted else None,
        )

    async def place(self, vm_id: str, host: str) -> int:
        """Raise the VM's epoch and set its host, atomically; returns the new epoch."""
        pipe = self._redis.pipeline(transaction=True)
        pipe.hincrby(placement_key(vm_id), "epoch", 1)
        pipe.hset(placement_key(vm_id), "host", host)
        epoch, _ = await pipe.execute()
        return int(epoch)

    async def unplace(self, vm_id: str) -> None:
        """The VM runs nowhere: no host may write its state until it is placed again."""
        await awaited(self._redis.hset(placement_key(vm_id), "host", ""))

    async def note_persisted(self, vm_id: str, at: float) -> None:
        """Remember when the newest version was persisted (the recovery point)."""
        await awaited(self._redis.hset(vm_record_key(vm_id), "last_persisted_at", str(at)))

    async def note_heartbeat(self, beat: HostHeartbeat) -> None:
        """Record a host's heartbeat."""
        record = {
            "capabilities": beat.capabilities.model_dump(mode="json"),
            "last_seen": time.time(),
        }
        await awaited(self._redis.hset(hosts_key(), beat.host, json.dumps(record)))

    async def hosts(self) -> list[HostRecord]:
        """Every host that ever sent a heartbeat."""
        raw = await awaited(self._redis.hgetall(hosts_key()))
        records = []
        for host, value in raw.items():
            data = json.loads(value)
            records.append(
                HostRecord(
                    host=host.decode(),
                    capabilities=HostCapabilities.model_validate(data["capabilities"]),
                    last_seen=float(data["last_seen"]),
                )
            )
        return records
