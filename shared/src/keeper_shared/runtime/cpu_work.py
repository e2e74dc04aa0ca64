"""Hashing, (de)compressing and encrypting state: in the event loop or in a worker thread,
by size."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import ParamSpec, TypeVar

INLINE_LIMIT = 64 * 1024
"""Up to this many bytes the work takes less CPU than a trip to a worker thread and back
(~40 µs: submit, wake-up, result handed back through the loop's self-pipe), and blocks the
loop for less than that; a 16 KiB TPM state is hashed and compressed in ~15 µs. Larger
states (NVRAM) go to a thread so the loop stays responsive to heartbeats and commands."""

_Params = ParamSpec("_Params")
_Result = TypeVar("_Result")


async def run_sized(
    size: int,
    function: Callable[_Params, _Result],
    /,
    *args: _Params.args,
    **kwargs: _Params.kwargs,
) -> _Result:
    """``function(*args, **kwargs)`` for work on ``size`` bytes: inline when small, else in
    a worker thread."""
    if size <= INLINE_LIMIT:
        return function(*args, **kwargs)
    return await asyncio.to_thread(function, *args, **kwargs)
