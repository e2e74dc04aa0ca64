"""Announcing stable changes in batches: one ``state.changed`` per flush, not per VM.

Batches form like group commits: a change found while no announcement is on its way goes
at once (with whatever else was found in the same turn of the loop), so a light load pays no
extra latency; changes found while one is on its way wait for its confirm and then go
together. Each caller returns once its own change was confirmed by the broker, or raises
what kept it from being, exactly as if it had published alone.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from keeper_shared.messages.state import MAX_VMS_PER_MESSAGE, StateChange, StateChanged

PublishEvent = Callable[[StateChanged], Awaitable[None]]


class ChangeAnnouncer:
    """One host's queue of changes to announce."""

    def __init__(self, host_id: str, publish: PublishEvent) -> None:
        self._host_id = host_id
        self._publish = publish
        self._waiting: list[tuple[StateChange, asyncio.Future[None]]] = []
        self._flusher: asyncio.Task[None] | None = None

    async def announce(self, change: StateChange) -> None:
        """Publish ``change`` in the next batch; return once the broker confirmed it."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append((change, future))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush(), name="announce-changes")
        await future

    async def close(self) -> None:
        """Stop flushing; changes still waiting see a cancellation."""
        if self._flusher is not None:
            self._flusher.cancel()
            await asyncio.gather(self._flusher, return_exceptions=True)

    async def _flush(self) -> None:
        batch: list[tuple[StateChange, asyncio.Future[None]]] = []
        try:
            while self._waiting:
                await asyncio.sleep(0)  # changes found in this same turn join the batch
                batch = self._waiting[:MAX_VMS_PER_MESSAGE]
                del self._waiting[:MAX_VMS_PER_MESSAGE]
                try:
                    await self._publish(
                        StateChanged(host=self._host_id, changes=[change for change, _ in batch])
                    )
                except Exception as error:
                    _settle(batch, error)
                else:
                    _settle(batch, None)
                batch = []
        finally:
            # Cancelled (the agent stops): nobody is left waiting forever.
            for _, future in [*batch, *self._waiting]:
                future.cancel()
            self._waiting.clear()


def _settle(batch: list[tuple[StateChange, asyncio.Future[None]]], error: Exception | None) -> None:
    for _, future in batch:
        if future.done():  # its caller was cancelled meanwhile
            continue
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)
