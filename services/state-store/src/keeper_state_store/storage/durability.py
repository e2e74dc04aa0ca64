"""Refusing to run on a Redis that would forget acknowledged writes (invariant 1)."""

from __future__ import annotations

from redis.asyncio import Redis


class VolatileRedisError(RuntimeError):
    """Redis has the append-only file off; a restart would lose acknowledged state."""


async def ensure_durable(redis: Redis, *, allow_volatile: bool) -> str:
    """Check ``appendonly`` and ``appendfsync``; return a one-line description."""
    config = await redis.config_get("append*")
    appendonly = config.get("appendonly", "no")
    fsync = config.get("appendfsync", "?")
    if appendonly != "yes" and not allow_volatile:
        raise VolatileRedisError(
            "Redis has appendonly=no: acknowledged state would be lost on restart. "
            "Turn the append-only file on, or set KEEPER_STORE_ALLOW_VOLATILE_REDIS=true in tests."
        )
    return f"appendonly={appendonly} appendfsync={fsync}"
