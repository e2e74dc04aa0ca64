"""Which VMs hold each domain name, so that a name is registered once unless a second VM of
it was allowed. A claim is one script on the name's own key: two replicas registering one
name at the same moment cannot both pass (a scan of the VM records could not promise that).

A claim is made before the VM's record is written; a replica that dies in between leaves a
claim without a record. Such a claim is stale once it is older than any registration takes
(:data:`STALE_CLAIM_S`), and the next claim on the name drops it. Records registered before
the index existed are added to it once, at start (:meth:`VmNames.index_existing`).
"""

from __future__ import annotations

import time

import structlog
from pydantic import ValidationError
from redis.asyncio import Redis

from keeper_policy.storage.keys import NAMES_INDEXED, vm_name_key
from keeper_policy.storage.scripts import PolicyScripts
from keeper_shared.messages.tpm import VmSpec
from keeper_shared.redis_access.keys import vm_record_key
from keeper_shared.redis_access.results import awaited

log = structlog.get_logger(__name__)

STALE_CLAIM_S = 60.0
"""A claim this old without a VM record was left by a registration that never finished."""


class VmNames:
    """Claims on domain names in Redis."""

    def __init__(self, redis: Redis, scripts: PolicyScripts) -> None:
        self._redis = redis
        self._scripts = scripts

    async def claim(self, name: str, vm_id: str, *, exclusive: bool) -> list[str]:
        """Claim ``name`` for ``vm_id``; exclusive: only if no other VM holds it. Returns the
        other holders when refused (sorted), else []."""
        for _attempt in range(2):
            now = time.time()
            raw = await self._scripts.name_claim(
                keys=[vm_name_key(name)], args=[vm_id, "1" if exclusive else "0", repr(now)]
            )
            others = {
                holder.decode(): claimed_at.decode()
                for holder, claimed_at in zip(raw[::2], raw[1::2], strict=True)
            }
            if not others:
                return []
            stale = [
                (holder, claimed_at)
                for holder, claimed_at in others.items()
                if float(claimed_at) < now - STALE_CLAIM_S and not await self._registered(holder)
            ]
            if not stale:
                return sorted(others)
            for holder, claimed_at in stale:
                log.info("stale name claim dropped", name=name, vm_id=holder)
                await self._scripts.name_release(
                    keys=[vm_name_key(name)], args=[holder, claimed_at]
                )
        return sorted(others)

    async def release(self, name: str, vm_id: str) -> None:
        """Drop ``vm_id``'s claim on ``name`` (renamed, refused or forgotten)."""
        await self._scripts.name_release(keys=[vm_name_key(name)], args=[vm_id])

    async def index_existing(self) -> int:
        """Claim the name of every VM record registered before the index existed, once per
        Redis; returns how many records were read (0 when indexed already)."""
        if await awaited(self._redis.exists(NAMES_INDEXED)):
            return 0
        count = 0
        async for key in self._redis.scan_iter(match=vm_record_key("*"), count=500):
            raw = await awaited(self._redis.hget(key, "spec"))
            if raw is None:
                continue
            try:
                spec = VmSpec.model_validate_json(raw)
            except ValidationError:
                continue  # not a spec this release reads: nor could it compare its name
            await self.claim(spec.name, spec.vm_id, exclusive=False)
            count += 1
        await awaited(self._redis.set(NAMES_INDEXED, "1"))
        log.info("domain names indexed", vms=count)
        return count

    async def _registered(self, vm_id: str) -> bool:
        return bool(await awaited(self._redis.hexists(vm_record_key(vm_id), "spec")))
