"""Coalescing pulls per host: many ``state.changed`` events for one host, one ``state.fetch``.

A host that boots fifty VMs announces fifty changes at once; fetching them one by one costs
fifty round trips through the broker. Batches form like group commits: a request to a host
with no fetch in flight goes at once with whatever arrived together (at a light load there
is nothing to wait for, and waiting would only add latency); while fetches are in flight,
requests gather for a window and then share the next fetch. Up to ``max_in_flight`` batches
per host overlap, so the next fetch travels while the previous batch is being written
(one batch at a time left the broker and Redis idle half of each round). Two batches may
carry the same VM; the fenced write keeps the newer state whichever lands last.

Every caller still gets its own answer: its call returns only once its VM's blobs from
that fetch were durably written (or found duplicate, or refused), and raises if the fetch
or its VM's write failed, so each event is acknowledged after its own write.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

import structlog

from keeper_shared.messages.types import StateKind

PullResults = Mapping[str, BaseException | None]
"""Per VM: None when its blobs were handled, else what went wrong for it."""

BatchPull = Callable[[str, dict[str, set[StateKind]]], Awaitable[PullResults]]
"""Fetch these VMs' kinds from a host in one call and persist them (raising when the fetch
itself failed)."""


@dataclass
class _Batch:
    kinds: dict[str, set[StateKind]] = field(default_factory=dict)
    waiters: dict[str, list[asyncio.Future[None]]] = field(default_factory=dict)


class PullBatcher:
    """Per-host coalescing of pull requests into batched fetches."""

    def __init__(
        self, pull: BatchPull, *, window_s: float, max_vms: int, max_in_flight: int
    ) -> None:
        self._pull = pull
        self._window_s = window_s
        self._max_vms = max_vms
        self._max_in_flight = max_in_flight
        self._pending: dict[str, _Batch] = {}
        self._runners: dict[str, asyncio.Task[None]] = {}
        self._in_flight: dict[str, set[asyncio.Task[None]]] = {}

    async def pull(self, host: str, vm_id: str, kind: StateKind) -> None:
        """Have ``kind`` of ``vm_id`` pulled from ``host`` in the next batch; return once it
        was persisted, or raise what kept it from being."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        batch = self._pending.setdefault(host, _Batch())
        batch.kinds.setdefault(vm_id, set()).add(kind)
        batch.waiters.setdefault(vm_id, []).append(future)
        if host not in self._runners:
            self._runners[host] = asyncio.create_task(self._run(host), name=f"pull-{host}")
        await future

    async def close(self) -> None:
        """Cancel batches still waiting or running (their callers see the cancellation)."""
        tasks = [
            *self._runners.values(),
            *(task for flying in self._in_flight.values() for task in flying),
        ]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _run(self, host: str) -> None:
        """One host's dispatcher: form a batch, start its fetch, repeat while work waits."""
        # The task inherited the context of the event that started it; its log lines speak
        # for a batch, not for that one event.
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(pull_host=host)
        flying = self._in_flight.setdefault(host, set())
        try:
            while host in self._pending:
                # Idle: one turn of the loop takes in what arrived together. Busy: let the
                # next batch fill while the fetches in flight are answered.
                await asyncio.sleep(self._window_s if flying else 0)
                while len(flying) >= self._max_in_flight:
                    await asyncio.wait(flying, return_when=asyncio.FIRST_COMPLETED)
                batch = self._take(host)
                task = asyncio.create_task(self._fetch(host, batch), name=f"fetch-{host}")
                flying.add(task)
                task.add_done_callback(flying.discard)
        finally:
            # Only reached with work outstanding when cancelled: nobody may wait forever.
            del self._runners[host]
            leftover = self._pending.pop(host, None)
            if leftover is not None:
                _answer(leftover, dict.fromkeys(leftover.kinds, asyncio.CancelledError()))

    async def _fetch(self, host: str, batch: _Batch) -> None:
        """One batch: fetch and persist, then answer each of its callers."""
        try:
            results: PullResults = await self._pull(host, batch.kinds)
        except asyncio.CancelledError:
            _answer(batch, dict.fromkeys(batch.kinds, asyncio.CancelledError()))
            raise
        except Exception as error:
            results = dict.fromkeys(batch.kinds, error)
        _answer(batch, results)

    def _take(self, host: str) -> _Batch:
        """Up to ``max_vms`` VMs off the host's pending batch; the rest stays for the next."""
        pending = self._pending[host]
        if len(pending.kinds) <= self._max_vms:
            del self._pending[host]
            return pending
        taken = _Batch()
        for vm_id in list(pending.kinds)[: self._max_vms]:
            taken.kinds[vm_id] = pending.kinds.pop(vm_id)
            taken.waiters[vm_id] = pending.waiters.pop(vm_id)
        return taken


def _answer(batch: _Batch, results: PullResults) -> None:
    for vm_id, futures in batch.waiters.items():
        outcome = results.get(vm_id)
        for future in futures:
            if future.done():  # its caller was cancelled (shutdown); the event is requeued
                continue
            if outcome is None:
                future.set_result(None)
            elif isinstance(outcome, asyncio.CancelledError):
                future.cancel()
            else:
                future.set_exception(outcome)
