"""Coalescing pulls per host: many ``state.changed`` events for one host, one ``state.fetch``.

A host that boots fifty VMs announces fifty changes at once; fetching them one by one costs
fifty round trips through the broker. Here each request waits a few milliseconds for others
to the same host, and requests that arrive while a fetch to that host is in flight wait for
the next one. Every caller still gets its own answer: its call returns only once its VM's
blobs from that fetch were durably written (or found duplicate, or refused), and raises if
the fetch or its VM's write failed, so each event is acknowledged after its own write.
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

    def __init__(self, pull: BatchPull, *, window_s: float, max_vms: int) -> None:
        self._pull = pull
        self._window_s = window_s
        self._max_vms = max_vms
        self._pending: dict[str, _Batch] = {}
        self._runners: dict[str, asyncio.Task[None]] = {}

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
        """Cancel batches still running (their callers see the cancellation)."""
        runners = list(self._runners.values())
        for runner in runners:
            runner.cancel()
        await asyncio.gather(*runners, return_exceptions=True)

    async def _run(self, host: str) -> None:
        """One host's loop: gather for the window, fetch, answer, repeat while work waits."""
        # The task inherited the context of the event that started it; its log lines speak
        # for a batch, not for that one event.
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(pull_host=host)
        batch: _Batch | None = None
        try:
            while host in self._pending:
                await asyncio.sleep(self._window_s)
                batch = self._take(host)
                try:
                    results: PullResults = await self._pull(host, batch.kinds)
                except Exception as error:
                    results = dict.fromkeys(batch.kinds, error)
                _answer(batch, results)
                batch = None
        finally:
            # Only reached with work outstanding when cancelled: nobody may wait forever.
            del self._runners[host]
            for leftover in (batch, self._pending.pop(host, None)):
                if leftover is not None:
                    _answer(leftover, dict.fromkeys(leftover.kinds, asyncio.CancelledError()))

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
