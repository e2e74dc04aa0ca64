"""Policy's record of the domains hosts reported that are not adopted: the fact, why not,
and when; and the hosts whose reports wait for their first heartbeat."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

from redis.asyncio import Redis

from keeper_policy.storage.keys import DISCOVERED, DISCOVERY_WAITING
from keeper_shared.messages.adoption import UnprotectedVmView, VmDiscovered
from keeper_shared.redis_access.results import awaited


@dataclass(frozen=True)
class DiscoveredRecord:
    """A reported domain that is not adopted."""

    fact: VmDiscovered
    reasons: list[str]
    reported_at: float

    def view(self) -> UnprotectedVmView:
        """As the CLI shows it."""
        return UnprotectedVmView(
            vm_id=self.fact.vm_id,
            name=self.fact.name,
            host=self.fact.host,
            running=self.fact.running,
            reasons=self.reasons,
            reported_at=datetime.fromtimestamp(self.reported_at, UTC),
        )


class DiscoveredDomains:
    """Redis access for the domains that are reported and not adopted."""

    def __init__(self, redis: Redis) -> None:
        self._redis = redis

    async def note(self, record: DiscoveredRecord) -> None:
        """Remember the domain (replacing what was known of it)."""
        value = json.dumps(
            {
                "fact": record.fact.model_dump(mode="json"),
                "reasons": record.reasons,
                "reported_at": record.reported_at,
            }
        )
        await awaited(self._redis.hset(DISCOVERED, record.fact.vm_id, value))

    async def forget(self, vm_id: str, host: str | None = None) -> None:
        """Forget the domain (adopted, or gone); only when ``host`` reported it, if given."""
        if host is not None:
            known = await self.get(vm_id)
            if known is None or known.fact.host != host:
                return
        await awaited(self._redis.hdel(DISCOVERED, vm_id))

    async def get(self, vm_id: str) -> DiscoveredRecord | None:
        """The record of one domain, None when none."""
        raw = await awaited(self._redis.hget(DISCOVERED, vm_id))
        return _parse(raw) if raw else None

    async def all(self) -> list[DiscoveredRecord]:
        """Every record, by host and then name."""
        raw = await awaited(self._redis.hgetall(DISCOVERED))
        records = [_parse(value) for value in raw.values()]
        return sorted(records, key=lambda r: (r.fact.host, r.fact.name, r.fact.vm_id))

    async def named(self, reference: str, host: str | None) -> list[DiscoveredRecord]:
        """The records ``reference`` (a UUID or a domain name) names, on ``host`` if given."""
        try:
            vm_id: str | None = str(uuid.UUID(reference))
        except ValueError:
            vm_id = None
        if vm_id is not None:
            found = await self.get(vm_id)
            candidates = [found] if found is not None else []
        else:
            candidates = [r for r in await self.all() if r.fact.name == reference]
        return [r for r in candidates if host is None or r.fact.host == host]

    async def wait_for_heartbeat(self, host: str) -> None:
        """Decide the host's reports again on its next heartbeat."""
        await awaited(self._redis.sadd(DISCOVERY_WAITING, host))

    async def take_waiting(self, host: str) -> bool:
        """True (once) when the host's reports wait for its heartbeat."""
        return bool(await awaited(self._redis.srem(DISCOVERY_WAITING, host)))


def _parse(raw: bytes | str) -> DiscoveredRecord:
    data = json.loads(raw)
    return DiscoveredRecord(
        fact=VmDiscovered.model_validate(data["fact"]),
        reasons=list(data["reasons"]),
        reported_at=float(data["reported_at"]),
    )
