"""Refusing to run on a Redis that would forget acknowledged writes (invariant 1)."""

from __future__ import annotations

from typing import Any

from redis.asyncio import Redis

from keeper_shared.redis_access.connection import cluster_of


class VolatileRedisError(RuntimeError):
    """Redis has the append-only file off; a restart would lose acknowledged state."""


async def ensure_durable(redis: Redis, *, allow_volatile: bool) -> str:
    """Check ``appendonly`` and ``appendfsync``; return a one-line description.

    On a Redis Cluster every node is asked, replicas too: each may become a primary."""
    cluster = cluster_of(redis)
    if cluster is None:
        return _judge({"redis": await redis.config_get("append*")}, allow_volatile)
    configs: dict[str, Any] = await cluster.config_get("append*", target_nodes=cluster.ALL_NODES)
    return _judge(configs, allow_volatile)


def _judge(configs: dict[str, Any], allow_volatile: bool) -> str:
    """``configs``: per node, its ``append*`` settings."""
    found = {
        (config.get("appendonly", "no"), config.get("appendfsync", "?"))
        for config in configs.values()
    }
    volatile = sorted(node for node, config in configs.items() if config.get("appendonly") != "yes")
    if volatile and not allow_volatile:
        where = f" on {', '.join(volatile)}" if len(configs) > 1 else ""
        raise VolatileRedisError(
            f"Redis has appendonly=no{where}: acknowledged state would be lost "
            "on restart. Turn the append-only file on, or set "
            "KEEPER_STORE_ALLOW_VOLATILE_REDIS=true in tests."
        )
    described = "; ".join(f"appendonly={on} appendfsync={fsync}" for on, fsync in sorted(found))
    return described if len(configs) == 1 else f"{described} ({len(configs)} nodes)"
