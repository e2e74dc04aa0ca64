"""Claims on domain names against a real Redis: of many approvals of one name at the same
moment exactly one gets it; a renamed or forgotten VM gives its name up; a claim a dead
registration left behind is dropped once stale, a fresh one is respected; records an older
release registered are indexed once."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from keeper_policy.storage.keys import vm_name_key
from keeper_policy.storage.scripts import PolicyScripts
from keeper_policy.storage.vm_names import STALE_CLAIM_S
from keeper_policy.storage.vm_registry import PolicyRegistry
from keeper_shared.messages.tpm import VmSpec
from keeper_shared.redis_access.keys import vm_record_key
from keeper_shared.redis_access.results import awaited
from support.redis_db import PrivateDatabase

pytestmark = [pytest.mark.redis]


def registry_of(private_redis: PrivateDatabase) -> PolicyRegistry:
    return PolicyRegistry(private_redis.client, PolicyScripts(private_redis.client))


def spec(name: str, vm_id: str | None = None) -> VmSpec:
    return VmSpec(vm_id=vm_id or str(uuid.uuid4()), name=name, guest_os="windows-11")


async def test_of_many_claims_of_one_name_at_once_exactly_one_wins(
    private_redis: PrivateDatabase,
) -> None:
    # Each claimant on its own connection, as replicas are.
    registries = [registry_of(private_redis) for _ in range(20)]
    vm_ids = [str(uuid.uuid4()) for _ in registries]

    refusals = await asyncio.gather(
        *(
            registry.names.claim("win-01", vm_id, exclusive=True)
            for registry, vm_id in zip(registries, vm_ids, strict=True)
        )
    )

    winners = [vm_id for vm_id, holders in zip(vm_ids, refusals, strict=True) if not holders]
    assert len(winners) == 1, refusals
    assert all(holders == winners for holders in refusals if holders)


async def test_a_renamed_or_forgotten_vm_gives_its_name_up(
    private_redis: PrivateDatabase,
) -> None:
    registry = registry_of(private_redis)
    first = spec("web-01")
    await registry.register_vm(first, "")
    assert await registry.names.claim("web-01", "other", exclusive=True) == [first.vm_id]

    await registry.register_vm(spec("web-02", first.vm_id), "")
    assert await registry.names.claim("web-01", "other", exclusive=True) == []
    assert await registry.names.claim("web-02", "third", exclusive=True) == [first.vm_id]

    assert await registry.forget(first.vm_id) is None
    assert await registry.names.claim("web-02", "third", exclusive=True) == []


async def test_a_stale_claim_without_a_record_is_dropped_a_fresh_one_is_not(
    private_redis: PrivateDatabase,
) -> None:
    registry = registry_of(private_redis)
    redis = private_redis.client
    # Registrations that claimed the name and died before writing their record.
    await awaited(redis.hset(vm_name_key("old"), "dead", repr(time.time() - STALE_CLAIM_S - 1)))
    await awaited(redis.hset(vm_name_key("new"), "in-flight", repr(time.time())))

    assert await registry.names.claim("old", "mine", exclusive=True) == []
    assert await registry.names.claim("new", "mine", exclusive=True) == ["in-flight"]
    # Stale but registered: a real holder, whatever its age.
    holder = spec("kept")
    await registry.register_vm(holder, "")
    stale = repr(time.time() - STALE_CLAIM_S - 1)
    await awaited(redis.hset(vm_name_key("kept"), holder.vm_id, stale))
    assert await registry.names.claim("kept", "mine", exclusive=True) == [holder.vm_id]


async def test_records_an_older_release_registered_are_indexed_once(
    private_redis: PrivateDatabase,
) -> None:
    registry = registry_of(private_redis)
    legacy = spec("legacy-01")
    # What 0.2.0 wrote: the record alone.
    record = {"spec": legacy.model_dump_json(), "tpm_xml": ""}
    await awaited(private_redis.client.hset(vm_record_key(legacy.vm_id), mapping=record))

    assert await registry.names.index_existing() == 1
    assert await registry.names.index_existing() == 0
    assert await registry.names.claim("legacy-01", "new", exclusive=True) == [legacy.vm_id]
