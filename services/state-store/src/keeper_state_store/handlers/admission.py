"""Admission of changes: how many announced changes one replica works on at once.

The broker's prefetch counts events, and an event carries one change or a few hundred. In
a boot storm a replica took its prefetch of events of a hundred changes each: ten thousand
changes opened, verified and written side by side, each event done only when all of its
changes were, the event loop so far behind that the broker's confirms of ``state.persisted``
were read after their bound and whole events were given back and redone. Admitting changes
by count keeps what is in flight to what the write pipelines can take, in arrival order
(first come, first served, so no host's events starve), while small events from many hosts
still fill the replica.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator


class ChangeAdmission:
    """A first-come, first-served gate holding at most ``capacity`` changes."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self._capacity = capacity
        self._free = capacity
        self._waiting: deque[tuple[int, asyncio.Future[None]]] = deque()

    @property
    def in_flight(self) -> int:
        """Changes admitted and not yet released."""
        return self._capacity - self._free

    @contextlib.asynccontextmanager
    async def admit(self, changes: int) -> AsyncIterator[None]:
        """Hold room for ``changes`` while the block runs (an event larger than the gate
        waits for all of it, so it is neither refused nor starved)."""
        wanted = min(max(changes, 0), self._capacity)
        await self._acquire(wanted)
        try:
            yield
        finally:
            self._release(wanted)

    async def _acquire(self, wanted: int) -> None:
        if wanted == 0:
            return  # nothing to hold: no reason to queue behind those who hold something
        if not self._waiting and self._free >= wanted:
            self._free -= wanted
            return
        granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append((wanted, granted))
        try:
            await granted
        except asyncio.CancelledError:
            if granted.done() and not granted.cancelled():
                self._release(wanted)  # admitted just as it was cancelled
            else:
                self._wake()  # it may have been the one holding up the queue
            raise

    def _release(self, count: int) -> None:
        self._free += count
        self._wake()

    def _wake(self) -> None:
        while self._waiting:
            wanted, granted = self._waiting[0]
            if granted.done():  # its waiter was cancelled
                self._waiting.popleft()
                continue
            if self._free < wanted:
                return
            self._waiting.popleft()
            self._free -= wanted
            granted.set_result(None)
