"""Waiting for something to become true, with a bound that only a hang reaches."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable

WAIT_TIMEOUT_S = 45.0
"""Default bound on one wait: generous for a loaded 2-core CI box, so only a hang reaches
it."""


class WaitTimeoutError(AssertionError):
    """What a test waited for did not happen in time. An AssertionError, so pytest reports
    the test as failed (the code under test did not do it), not as broken."""


async def wait_until(
    condition: Callable[[], Awaitable[bool] | bool],
    what: str,
    timeout_s: float = WAIT_TIMEOUT_S,
    *,
    poll_s: float = 0.1,
) -> float:
    """Poll ``condition`` (plain or async) every ``poll_s`` until it holds; return how many
    seconds that took. Raise WaitTimeoutError naming ``what`` after ``timeout_s``; an error
    the condition raises ends the wait at once."""
    started = time.monotonic()
    while True:
        holds = condition()
        if inspect.isawaitable(holds):
            holds = await holds
        if holds:
            return time.monotonic() - started
        if time.monotonic() - started > timeout_s:
            raise WaitTimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        await asyncio.sleep(poll_s)
