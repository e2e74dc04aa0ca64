"""Group commit across hosts: concurrent calls to Redis from different events share one
pipeline.

Fetches are per host (only the host holds its VMs' state), so when the same VMs in flight
are spread over a hundred hosts each fetch brings back two VMs instead of two hundred, and
every batch paid its own data-key read, its own pipeline round trip, its own wait for the
replicas and its own AOF fsync. The store's throughput then fell with the number of hosts.
The same held for the reads each ``state.changed`` makes before anything is written (the
heads and placements of what it announces): a thousand hosts with a change each were a
thousand round trips where one host with a thousand changes was one.

Here the groups that are ready while a call is on its way wait for it and then go
together, whichever host they came from (at a light load a group goes at once: there is
nothing to wait for). Each write is still its own fenced script with its own result, so
fencing, the per-VM outcome and the acknowledgement of each event after its own durable
write are unchanged. Writes name a key each: a group whose VM and kind are already in the
call being formed, or in a call still on its way, waits for a later one (the repository
takes one write per VM and kind per pipeline, and a VM's later change must not overtake its
earlier one in a call that happens to finish first: the earlier one would be verified and
written for nothing, refused as stale); reads name none and always join.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections import Counter
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")

CallAll = Callable[[list[Item]], Awaitable[Sequence[Result]]]
"""Do these items together; one result per item, in order (raises when none was done)."""


@dataclass
class _Group(Generic[Item, Result]):
    items: list[Item]
    keys: set[Hashable]
    future: asyncio.Future[list[Result]]


class Coalescer(Generic[Item, Result]):
    """Merges concurrent groups of items into shared calls of ``call_all``; ``key_of``
    names what at most one item of a call may touch (None: items never exclude each other)."""

    def __init__(
        self,
        call_all: CallAll[Item, Result],
        key_of: Callable[[Item], Hashable] | None,
        *,
        max_items: int,
        max_in_flight: int,
    ) -> None:
        self._call_all = call_all
        self._key_of = key_of
        self._max_items = max_items
        self._slots = asyncio.Semaphore(max_in_flight)
        self._waiting: list[_Group[Item, Result]] = []
        self._dispatcher: asyncio.Task[None] | None = None
        self._flying: set[asyncio.Task[None]] = set()
        self._flying_keys: Counter[Hashable] = Counter()
        self._news = asyncio.Event()
        """Set when a call lands (groups that waited for its keys may go) or a group
        arrives."""
        self._closed = False

    async def call(self, items: list[Item]) -> list[Result]:
        """Have ``items`` done in the next shared call; their results, in order."""
        if not items:
            return []
        if self._closed:
            raise asyncio.CancelledError("the store is stopping")
        future: asyncio.Future[list[Result]] = asyncio.get_running_loop().create_future()
        keys = set() if self._key_of is None else {self._key_of(item) for item in items}
        self._waiting.append(_Group(items, keys, future))
        self._news.set()
        if self._dispatcher is None or self._dispatcher.done():
            # In a context of its own: the shared calls serve many events, and must not log
            # under the one whose call happened to start the dispatcher.
            self._dispatcher = asyncio.create_task(
                self._dispatch(), name="coalescer", context=contextvars.Context()
            )
        return await future

    async def close(self) -> None:
        """Cancel what waits or is under way (its callers see the cancellation), and any
        later call."""
        self._closed = True
        tasks = [task for task in (self._dispatcher, *self._flying) if task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _dispatch(self) -> None:
        try:
            while self._waiting:
                await self._slots.acquire()
                # Batches that became ready in this same turn of the loop join the call.
                await asyncio.sleep(0)
                taken = self._take()
                if not taken:
                    # Every group waits for a key of a call on its way: wait for one to land
                    # (or for a group that may go at once).
                    self._slots.release()
                    self._news.clear()
                    await self._news.wait()
                    continue
                keys = [key for group in taken for key in group.keys]
                self._flying_keys.update(keys)
                task = asyncio.create_task(self._run(taken, keys), name="coalesced-call")
                self._flying.add(task)
                task.add_done_callback(self._flying.discard)
        finally:
            # Only reached with groups waiting when cancelled: nobody may wait forever.
            for group in self._waiting:
                group.future.cancel()
            self._waiting.clear()

    def _take(self) -> list[_Group[Item, Result]]:
        """Waiting groups, oldest first, up to ``max_items`` (at least one group, when one
        may go) and none that writes a key already taken or still on its way."""
        taken: list[_Group[Item, Result]] = []
        keys: set[Hashable] = set()
        count = 0
        left: list[_Group[Item, Result]] = []
        for group in self._waiting:
            fits = not taken or count + len(group.items) <= self._max_items
            free = keys.isdisjoint(group.keys) and not any(
                key in self._flying_keys for key in group.keys
            )
            if fits and free:
                taken.append(group)
                keys |= group.keys
                count += len(group.items)
            else:
                # A later group with the same key waits too, so a key's groups go in order.
                keys |= group.keys
                left.append(group)
        self._waiting = left
        return taken

    async def _run(self, groups: list[_Group[Item, Result]], keys: list[Hashable]) -> None:
        try:
            items = [item for group in groups for item in group.items]
            try:
                results = list(await self._call_all(items))
            except asyncio.CancelledError:
                for group in groups:
                    group.future.cancel()
                raise
            except Exception as error:
                for group in groups:
                    if not group.future.done():
                        group.future.set_exception(error)
                return
            start = 0
            for group in groups:
                end = start + len(group.items)
                if not group.future.done():
                    group.future.set_result(results[start:end])
                start = end
        finally:
            self._flying_keys.subtract(keys)
            self._flying_keys += Counter()  # drops the keys no call holds any more
            self._slots.release()
            self._news.set()
