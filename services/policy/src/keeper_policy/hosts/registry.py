"""Policy's records of hosts in Redis: the last heartbeat (capabilities, cluster, inventory),
whether the host is alive or declared lost, and the VMs it must remove when it reports them.

The heartbeat record keeps the shape other tools read (``capabilities``, ``last_seen``);
liveness lives in one status hash so alive -> lost and lost -> alive are single atomic
scripts with exactly one winning replica.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

from redis.asyncio import Redis

from keeper_policy.storage.keys import HOST_STATUS, host_cleanup_key
from keeper_policy.storage.scripts import PolicyScripts
from keeper_shared.messages.host import HostCapabilities, HostHeartbeat
from keeper_shared.redis_access.keys import hosts_key
from keeper_shared.redis_access.results import awaited


@dataclass(frozen=True)
class HostRecord:
    """A host as its last heartbeat showed it."""

    host: str
    capabilities: HostCapabilities
    last_seen: float
    cluster: str = "default"
    inventory: dict[str, int] = field(default_factory=dict)
    """VM id -> the placement epoch the host holds it under."""
    lost_at: float | None = None
    """When it was declared lost; None while it is alive."""
    interval_s: float = 5.0
    """How often it sends heartbeats."""

    def alive(self, now: float, lost_after_s: float) -> bool:
        """Heard from recently and not declared lost."""
        return self.lost_at is None and now - self.last_seen <= lost_after_s


@dataclass(frozen=True)
class HeartbeatOutcome:
    """What one heartbeat changed."""

    returned: bool
    """The host had been declared lost; this replica is the one that saw it come back."""
    lost_at: float | None = None


class HostRegistry:
    """Redis access for hosts."""

    def __init__(self, redis: Redis, scripts: PolicyScripts) -> None:
        self._redis = redis
        self._scripts = scripts

    async def note_heartbeat(self, beat: HostHeartbeat, at: float) -> HeartbeatOutcome:
        """Record a host's heartbeat; tell whether it ends a loss."""
        record = {
            "capabilities": beat.capabilities.model_dump(mode="json"),
            "last_seen": at,
            "cluster": beat.cluster,
            "interval_s": beat.interval_s,
            "vms": {entry.vm_id: entry.epoch for entry in beat.vms},
        }
        await awaited(self._redis.hset(hosts_key(), beat.host, json.dumps(record)))
        reply = await self._scripts.host_beat(keys=[HOST_STATUS], args=[beat.host, at])
        if reply[0] == b"returned":
            return HeartbeatOutcome(returned=True, lost_at=float(reply[1]))
        return HeartbeatOutcome(returned=False)

    async def hosts(self) -> list[HostRecord]:
        """Every host that ever sent a heartbeat."""
        pipe = self._redis.pipeline(transaction=False)
        pipe.hgetall(hosts_key())
        pipe.hgetall(HOST_STATUS)
        raw, statuses = await pipe.execute()
        return [_record(host.decode(), value, statuses.get(host)) for host, value in raw.items()]

    async def live_in_cluster(
        self, cluster: str, lost_after_s: float
    ) -> dict[str, HostCapabilities]:
        """What each host of ``cluster`` heard from within ``lost_after_s`` can run: the
        cluster a TPM is approved against."""
        now = time.time()
        return {
            host.host: host.capabilities
            for host in await self.hosts()
            if host.cluster == cluster and host.alive(now, lost_after_s)
        }

    async def host(self, host: str) -> HostRecord | None:
        """One host, None when it never sent a heartbeat."""
        pipe = self._redis.pipeline(transaction=False)
        pipe.hget(hosts_key(), host)
        pipe.hget(HOST_STATUS, host)
        value, status = await pipe.execute()
        return None if value is None else _record(host, value, status)

    async def declare_lost(self, host: str, now: float, lost_after_s: float) -> float | None:
        """alive -> lost if its last heartbeat is too old; returns its last-seen time to the
        one replica that made the transition, None to everyone else."""
        reply = await self._scripts.declare_lost(keys=[HOST_STATUS], args=[host, now, lost_after_s])
        return float(reply[1]) if int(reply[0]) == 1 else None

    async def add_cleanup(self, host: str, vm_ids: list[str]) -> None:
        """These VMs must go from ``host`` when it reports them again."""
        if vm_ids:
            await awaited(self._redis.sadd(host_cleanup_key(host), *vm_ids))

    async def cleanup_set(self, host: str) -> set[str]:
        """VMs ``host`` must remove when it reports them."""
        members = await awaited(self._redis.smembers(host_cleanup_key(host)))
        return {member.decode() for member in members}

    async def drop_cleanup(self, host: str, vm_ids: list[str]) -> None:
        """Nothing more to remove for these VMs on ``host``."""
        if vm_ids:
            await awaited(self._redis.srem(host_cleanup_key(host), *vm_ids))


def _record(host: str, value: bytes, status: bytes | None) -> HostRecord:
    data = json.loads(value)
    lost_at = None
    if status is not None and status.startswith(b"lost:"):
        lost_at = float(status.split(b":")[1])
    return HostRecord(
        host=host,
        capabilities=HostCapabilities.model_validate(data["capabilities"]),
        last_seen=float(data["last_seen"]),
        cluster=str(data.get("cluster", "default")),
        inventory={str(k): int(v) for k, v in data.get("vms", {}).items()},
        lost_at=lost_at,
        interval_s=float(data.get("interval_s", 5.0)),
    )
