"""A write counts as durable only once the replica holds it (Redis WAIT), against a real
primary, replica and Sentinels."""

from __future__ import annotations

import asyncio

import pytest
from pydantic import SecretStr
from redis.asyncio.client import Pipeline
from redis.asyncio.sentinel import MasterNotFoundError

from keeper_devtools.localstack import RedisSentinelGroup
from keeper_shared.redis_access.connection import RedisSettings, connect_redis
from keeper_state_store.storage.replication import NotReplicatedError, ReplicaQuorum, run_replicated

pytestmark = [pytest.mark.redis]

ONE_REPLICA = ReplicaQuorum(min_replicas=1, timeout_ms=300)
ONE_REPLICA_PATIENT = ReplicaQuorum(min_replicas=1, timeout_ms=10_000)
"""For a wait that must succeed: a replica just back acknowledges once it has caught up, which
on a loaded machine took more than 300 ms (a clean-clone CI run failed on it)."""


async def _set(pipe: Pipeline, key: str, value: str) -> None:
    pipe.set(key, value)


async def _noop(_pipe: Pipeline) -> None:
    return None


async def test_a_write_is_durable_once_the_replica_holds_it_and_not_before(
    redis_sentinel_group: RedisSentinelGroup,
) -> None:
    group = redis_sentinel_group
    settings = RedisSettings(
        # Its user, password and TLS options (the address comes from the Sentinels).
        redis_url=group.servers[0].url,
        redis_sentinels=group.sentinel_addresses,
        redis_master_name=group.master_name,
        redis_sentinel_password=SecretStr(group.sentinel_password or ""),
    )
    # Every link is TLS and the Sentinels take their own password: without it, no
    # Sentinel names the primary.
    anonymous = connect_redis(settings.model_copy(update={"redis_sentinel_password": None}))
    try:
        with pytest.raises(MasterNotFoundError, match="Authentication required"):
            await anonymous.ping()
    finally:
        await anonymous.aclose()
    redis = connect_redis(settings, decode_responses=True)
    try:
        results = await run_replicated(redis, ONE_REPLICA, lambda p: _set(p, "k", "held"))
        assert results == [True]

        replica = next(server for server in group.servers if server is not group.primary())
        await asyncio.to_thread(replica.stop)
        with pytest.raises(NotReplicatedError, match="0 of 1 Redis replicas"):
            await run_replicated(redis, ONE_REPLICA, lambda p: _set(p, "k", "unreplicated"))
        # The primary has it; only its durability is unknown, so the caller must not
        # acknowledge and its retry (finding the write done) must wait again.
        assert await redis.get("k") == "unreplicated"
        with pytest.raises(NotReplicatedError):
            await run_replicated(redis, ONE_REPLICA, lambda p: _set(p, "k", "unreplicated"))

        await asyncio.to_thread(replica.start)
        await asyncio.to_thread(group.wait_for_replica)
        # A retry that writes nothing new still waits for everything written before it.
        assert await run_replicated(redis, ONE_REPLICA_PATIENT, _noop) == []
    finally:
        await redis.aclose()
