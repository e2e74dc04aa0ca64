"""A Redis database of the session's server that one test has to itself (the
``private_redis`` fixture in ``tests/conftest.py``)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import yarl
from redis.asyncio import Redis

PRIVATE_DB = 9
"""Not 0, which the services and most tests share. Tests run one at a time in a session and
the database is emptied around each, so one number serves every test that needs it."""


@dataclass(frozen=True)
class PrivateDatabase:
    """A database emptied before and after the test that holds it."""

    url: str
    """Its URL, for more clients (a second replica, a second scrubber)."""
    client: Redis


@contextlib.asynccontextmanager
async def private_database(redis_url: str) -> AsyncIterator[PrivateDatabase]:
    """Database `PRIVATE_DB` of the server at ``redis_url``, emptied before and after use,
    so a test that SCANs every key sees only its own."""
    parsed = yarl.URL(redis_url)
    url = str(parsed.with_path(f"/{PRIVATE_DB}").with_query(parsed.query))
    client = Redis.from_url(url)
    await client.flushdb()
    try:
        yield PrivateDatabase(url, client)
    finally:
        await client.flushdb()
        await client.aclose()
