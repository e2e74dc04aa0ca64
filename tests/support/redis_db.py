"""A Redis database of the session's server that one test module has to itself."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from redis.asyncio import Redis


def database_url(redis_url: str, db: int) -> str:
    """``redis_url`` pointing at database ``db``."""
    return f"{redis_url.rsplit('/', 1)[0]}/{db}"


@contextlib.asynccontextmanager
async def private_database(redis_url: str, db: int) -> AsyncIterator[Redis]:
    """Database ``db`` of the server at ``redis_url``, emptied before and after use, so a
    test that SCANs every key sees only its own."""
    client = Redis.from_url(database_url(redis_url, db))
    await client.flushdb()
    try:
        yield client
    finally:
        await client.flushdb()
        await client.aclose()
