"""Typing bridge for redis-py's asyncio client."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import TypeVar, cast

T = TypeVar("T")


async def awaited(result: Awaitable[T] | T) -> T:
    """Await a redis-py asyncio command result.

    redis-py annotates commands as ``Awaitable[T] | T`` because one class serves both the
    sync and the asyncio client; on the asyncio client the result is always awaitable.
    """
    return await cast(Awaitable[T], result)
