"""Announcing stable changes in batches: one ``state.changed`` per flush, not per VM.

Batches form like group commits: a change found while no announcement is on its way goes
at once (with whatever else was found in the same turn of the loop), so a light load pays no
extra latency; changes found while one is on its way wait for its confirm and then go
together. Each caller returns once its own change was confirmed by the broker, or raises
what kept it from being, exactly as if it had published alone.

With an inliner, each batch carries the state of its changes sealed to the store while its
byte budget lasts (see ``keeper_host_agent.detect.inline_state``), decided when the batch
goes, so the budget is the event's and a batch never waits for a blob to be sealed alone.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from keeper_host_agent.detect.inline_state import StateInliner
from keeper_shared.messages.state import MAX_VMS_PER_MESSAGE, StateChange, StateChanged
from keeper_shared.messages.types import StateBlob

PublishEvent = Callable[[StateChanged], Awaitable[None]]

_Waiting = tuple[StateChange, StateBlob | None, asyncio.Future[None]]


class ChangeAnnouncer:
    """One host's queue of changes to announce."""

    def __init__(
        self, host_id: str, publish: PublishEvent, inliner: StateInliner | None = None
    ) -> None:
        self._host_id = host_id
        self._publish = publish
        self._inliner = inliner
        self._waiting: list[_Waiting] = []
        self._flusher: asyncio.Task[None] | None = None

    async def announce(self, change: StateChange, inline: StateBlob | None = None) -> None:
        """Publish ``change`` in the next batch (with ``inline``, the blob it announces, sealed
        in when the batch's budget allows); return once the broker confirmed it."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append((change, inline, future))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush(), name="announce-changes")
        await future

    async def close(self) -> None:
        """Stop flushing; changes still waiting see a cancellation."""
        if self._flusher is not None:
            self._flusher.cancel()
            await asyncio.gather(self._flusher, return_exceptions=True)

    async def _flush(self) -> None:
        batch: list[_Waiting] = []
        try:
            while self._waiting:
                await asyncio.sleep(0)  # changes found in this same turn join the batch
                batch = self._waiting[:MAX_VMS_PER_MESSAGE]
                del self._waiting[:MAX_VMS_PER_MESSAGE]
                try:
                    await self._publish(
                        StateChanged(host=self._host_id, changes=self._changes(batch))
                    )
                except Exception as error:
                    _settle(batch, error)
                else:
                    _settle(batch, None)
                batch = []
        finally:
            # Cancelled (the agent stops): nobody is left waiting forever.
            for _, _, future in [*batch, *self._waiting]:
                future.cancel()
            self._waiting.clear()

    def _changes(self, batch: list[_Waiting]) -> list[StateChange]:
        """The batch's changes, with what fits inline when there is an inliner."""
        if self._inliner is None:
            return [change for change, _, _ in batch]
        return self._inliner.inline([(change, blob) for change, blob, _ in batch])


def _settle(batch: list[_Waiting], error: Exception | None) -> None:
    for _, _, future in batch:
        if future.done():  # its caller was cancelled meanwhile
            continue
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)
