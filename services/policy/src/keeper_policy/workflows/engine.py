"""Runs workflows under leases, in this replica or resumed from another.

Each workflow kind has a runner that carries out one step and says what comes next; the
engine saves the progress after every step (only while it holds the lease), renews the
lease while a step runs, and finishes the workflow. A sweep in every replica picks up
workflows whose lease expired (their replica died) and resumes them at the recorded step.
A replica that stops releases its leases, so another one resumes at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

import structlog

from keeper_policy.workflows.store import WorkflowRecord, WorkflowResult, WorkflowStore

log = structlog.get_logger(__name__)

SaveProgress = Callable[[WorkflowRecord], Awaitable[bool]]


@dataclass(frozen=True)
class StepOutcome:
    """What a step ended with: the record to save (its next step), or the final result."""

    record: WorkflowRecord
    result: WorkflowResult | None = None
    """Set when the workflow is over."""


class StepRunner(Protocol):
    """Carries out the steps of one workflow kind."""

    async def step(self, record: WorkflowRecord, save: SaveProgress) -> StepOutcome:
        """Run ``record``'s current step. ``save`` records progress made within the step
        (an attempt about to be made) and returns False when the lease is lost."""
        ...


class LeaseLostError(RuntimeError):
    """Another replica holds the workflow now; this one stops working on it."""


class WorkflowEngine:
    """One replica's share of the workflows."""

    def __init__(
        self,
        store: WorkflowStore,
        runners: Mapping[str, StepRunner],
        *,
        lease_s: float,
        sweep_interval_s: float,
    ) -> None:
        self._store = store
        self._runners = runners
        self._lease_s = lease_s
        self._sweep_interval_s = sweep_interval_s
        self.owner = f"{socket.gethostname()}/{os.getpid()}/{uuid.uuid4().hex[:8]}"
        self._running: dict[str, asyncio.Task[WorkflowResult | None]] = {}
        self._closing = False

    async def start(self, record: WorkflowRecord) -> tuple[WorkflowRecord, bool]:
        """Store a new workflow unless the VM has one; returns the VM's workflow and whether
        it is ``record``."""
        return await self._store.create(record)

    async def current(self, vm_id: str) -> WorkflowRecord | None:
        """The VM's workflow in progress, if any."""
        return await self._store.load(vm_id)

    def spawn(self, vm_id: str) -> None:
        """Run the VM's workflow in the background if its lease is free."""
        if vm_id not in self._running and not self._closing:
            self._launch(vm_id)

    async def run_to_end(self, record: WorkflowRecord, timeout_s: float) -> WorkflowResult | None:
        """Run (or wait for whoever runs) ``record`` until it finishes; its result, or None
        when it did not finish within ``timeout_s`` (it goes on without us)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            current = await self._store.load(record.vm_id)
            if current is None or current.id != record.id:
                return await self._store.result(record.vm_id, record.id)
            task = self._running.get(record.vm_id) or self._launch(record.vm_id)
            if task is not None:
                # asyncio.wait neither raises the task's error nor cancels it on timeout.
                await asyncio.wait({task}, timeout=max(0.0, deadline - time.monotonic()))
                if task.done() and not task.cancelled() and task.result() is None:
                    await asyncio.sleep(0.2)  # lease taken elsewhere, or a step failed
                continue
            await asyncio.sleep(0.2)
        return None

    def _launch(self, vm_id: str) -> asyncio.Task[WorkflowResult | None] | None:
        if self._closing:
            return None
        task = asyncio.create_task(self._acquire_and_run(vm_id))
        self._running[vm_id] = task
        task.add_done_callback(lambda done: self._forget(vm_id, done))
        return task

    def _forget(self, vm_id: str, task: asyncio.Task[WorkflowResult | None]) -> None:
        if self._running.get(vm_id) is task:
            del self._running[vm_id]

    async def _acquire_and_run(self, vm_id: str) -> WorkflowResult | None:
        if not await self._store.acquire(vm_id, self.owner, self._lease_s):
            return None
        lost = asyncio.Event()
        renewer = asyncio.create_task(self._renew(vm_id, asyncio.current_task(), lost))
        try:
            record = await self._store.load(vm_id)
            if record is None:
                await self._store.release(vm_id, self.owner)
                return None
            return await self._run(record)
        except LeaseLostError:
            log.warning("workflow lease lost; another replica resumes it", vm_id=vm_id)
            return None
        except asyncio.CancelledError:
            if not lost.is_set():
                raise  # this replica is stopping; close() releases the lease
            log.warning("workflow lease lost mid-step; another replica resumes it", vm_id=vm_id)
            return None
        except Exception:
            # The lease expires and a replica (maybe this one) resumes at the saved step.
            log.exception("workflow step failed; it will be resumed", vm_id=vm_id)
            return None
        finally:
            renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewer

    async def _run(self, record: WorkflowRecord) -> WorkflowResult:
        runner = self._runners[record.kind]
        log.info(
            "workflow running",
            vm_id=record.vm_id,
            kind=record.kind,
            step=record.step,
            workflow_id=record.id,
            owner=self.owner,
        )

        async def save(progress: WorkflowRecord) -> bool:
            return await self._store.save(progress, self.owner)

        while True:
            outcome = await runner.step(record, save)
            if outcome.result is not None:
                if not await self._store.finish(outcome.record, self.owner, outcome.result):
                    raise LeaseLostError(record.vm_id)
                log.info(
                    "workflow finished", vm_id=record.vm_id, kind=record.kind, ok=outcome.result.ok
                )
                return outcome.result
            if not await save(outcome.record):
                raise LeaseLostError(record.vm_id)
            record = outcome.record

    async def _renew(
        self, vm_id: str, worker: asyncio.Task[object] | None, lost: asyncio.Event
    ) -> None:
        while True:
            await asyncio.sleep(self._lease_s / 3)
            try:
                held = await self._store.renew(vm_id, self.owner, self._lease_s)
            except Exception as error:  # Redis unreachable: try again; the lease may expire
                log.warning("lease renewal failed", vm_id=vm_id, reason=type(error).__name__)
                continue
            if not held:
                lost.set()
                if worker is not None:
                    worker.cancel()
                return

    async def sweep_once(self) -> int:
        """Resume every workflow whose lease is free; returns how many were started."""
        started = 0
        for vm_id, created_at in await self._store.pending():
            if vm_id in self._running:
                continue
            record = await self._store.load(vm_id)
            if record is None:
                await self._store.drop_stale_index(vm_id, created_at)
                continue
            if self._launch(vm_id) is not None:
                started += 1
        return started

    async def sweep_forever(self) -> None:
        """Sweep every interval until cancelled."""
        while True:
            try:
                await self.sweep_once()
            except Exception as error:  # Redis restarting: the next sweep tries again
                log.warning("workflow sweep failed", reason=type(error).__name__)
            await asyncio.sleep(self._sweep_interval_s)

    async def close(self) -> None:
        """Stop running workflows here and release their leases so another replica resumes
        them at once."""
        self._closing = True
        tasks = list(self._running.items())
        for _, task in tasks:
            task.cancel()
        for vm_id, task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
            with contextlib.suppress(Exception):
                await self._store.release(vm_id, self.owner)
