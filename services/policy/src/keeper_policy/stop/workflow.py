"""Carries out the stop workflow's steps (see plan for their order and why).

Each step is one bounded command, so the whole stop is bounded. A step repeated after a
replica died is harmless: shutting down or powering off a stopped domain and undefining an
undefined one are no-ops on the host, a retrieval stores nothing new when nothing changed,
and the fence is a compare-and-set on the host the stop began on.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

import structlog

from keeper_policy.gateway import Gateway
from keeper_policy.hosts.registry import HostRegistry
from keeper_policy.stop.plan import (
    StopBounds,
    StopStep,
    first_step,
    loss_recorded,
    may_retrieve,
    next_step,
)
from keeper_policy.storage.vm_registry import PolicyRegistry
from keeper_policy.workflows.engine import LeaseLostError, SaveProgress, StepOutcome
from keeper_policy.workflows.store import WorkflowRecord, WorkflowResult
from keeper_shared.messages.commands import CommandOutcome
from keeper_shared.messages.placement import StateLossRecorded, StopTrigger, VmRetired
from keeper_shared.messages.replies import StopVmReply
from keeper_shared.observability import metrics

log = structlog.get_logger(__name__)

HostCommand = Callable[[str, str], Awaitable[CommandOutcome]]

STOP = "stop"
"""The workflow kind."""


def new_stop(vm_id: str, host: str, trigger: StopTrigger, bounds: StopBounds) -> WorkflowRecord:
    """A stop workflow for the VM on ``host``, not started yet."""
    return WorkflowRecord.new(
        vm_id,
        STOP,
        first_step(trigger).value,
        host,
        bounds.total_s(trigger),
        trigger=trigger.value,
    )


class StopRunner:
    """Steps of the stop workflow."""

    def __init__(
        self,
        gateway: Gateway,
        registry: PolicyRegistry,
        hosts: HostRegistry,
        bounds: StopBounds,
    ) -> None:
        self._gateway = gateway
        self._registry = registry
        self._hosts = hosts
        self._bounds = bounds

    async def step(self, record: WorkflowRecord, save: SaveProgress) -> StepOutcome:
        """Run the current step; return the record advanced to the next one."""
        step = StopStep(record.step)
        vm_id, host = record.vm_id, record.host
        if step is StopStep.DONE:
            return StepOutcome(record, await self._finish(record))
        # A host declared lost answers nothing: fail its steps at once instead of waiting
        # out every timeout (its VMs are cleaned up when it comes back).
        host_lost = await self._host_lost(host)
        if step is StopStep.RETRIEVE:
            return await self._retrieve(record, save, host_lost=host_lost)
        ok = False
        detail: dict[str, str] = {}
        if step is StopStep.SHUTDOWN:
            ok = not host_lost and await self._command_ok(
                "shutdown", record, self._gateway.shutdown
            )
            detail["guest_shut_down"] = str(ok).lower()
        elif step is StopStep.POWER_OFF:
            ok = not host_lost and await self._command_ok(
                "power-off", record, self._gateway.power_off
            )
        elif step is StopStep.FENCE:
            # From here on no host may write this VM's state, not even a late fetch reply.
            ok = await self._registry.unplace(vm_id, host)
            if not ok:
                log.warning("VM was placed elsewhere meanwhile", vm_id=vm_id, host=host)
        elif step is StopStep.UNDEFINE and await self._registry.is_adopted(vm_id):
            # An adopted VM's domain is its manager's: stopped and fenced, never undefined.
            ok = True
            detail["removed"] = "false"
            detail["kept"] = "true"
        elif step is StopStep.UNDEFINE:
            ok = not host_lost and await self._command_ok(
                "undefine", record, self._gateway.undefine
            )
            if not ok:
                # The host may still hold the domain and its state: it removes them, without
                # writing anything, when it next reports the VM.
                await self._hosts.add_cleanup(host, [vm_id])
            detail["removed"] = str(ok).lower()
        return StepOutcome(record.advanced(step=next_step(step, ok=ok).value, data=detail))

    async def _retrieve(
        self, record: WorkflowRecord, save: SaveProgress, *, host_lost: bool
    ) -> StepOutcome:
        out_of_time = host_lost or time.time() > record.deadline
        ok = False
        attempts = record.attempts
        error = f"host {record.host} is lost: nothing could be retrieved" if host_lost else None
        if may_retrieve(attempts, self._bounds, out_of_time=out_of_time):
            attempts += 1
            # Count the attempt before making it: a replica dying mid-attempt still used it,
            # so the bound holds across replicas.
            if not await save(record.advanced(attempts=attempts)):
                raise LeaseLostError(record.vm_id)
            result = await self._gateway.retrieve(record.vm_id, record.host)
            ok = result.ok
            if ok:
                log.info(
                    "final state retrieved",
                    vm_id=record.vm_id,
                    attempt=attempts,
                    versions=result.versions,
                )
            else:
                error = result.error or "the store gave no reason"
                log.warning(
                    "retrieval failed", vm_id=record.vm_id, attempt=attempts, reason=result.error
                )
        retry = may_retrieve(attempts, self._bounds, out_of_time=time.time() > record.deadline)
        retry = retry and not host_lost
        # The last attempt's error is kept: a loss recorded after a later step (out of time,
        # a resumed workflow) still says why.
        data = {"retrieved": "true"} if ok else ({"retrieval_error": error} if error else None)
        if loss_recorded(StopStep.RETRIEVE, ok=ok, may_retry=retry):
            reason = error or record.data.get("retrieval_error") or "out of time to retrieve"
            await self._record_loss(record, attempts, reason)
        return StepOutcome(
            record.advanced(
                step=next_step(StopStep.RETRIEVE, ok=ok, may_retry=retry).value,
                attempts=attempts,
                data=data,
            )
        )

    async def _record_loss(self, record: WorkflowRecord, attempts: int, reason: str) -> None:
        vm = await self._registry.vm(record.vm_id)
        age = time.time() - vm.last_persisted_at if vm.last_persisted_at else None
        metrics.RETRIEVALS_ABANDONED.inc()
        if age is not None:
            metrics.RECOVERY_POINT_AGE_SECONDS.observe(age)
        await self._gateway.publish(
            StateLossRecorded(
                vm_id=record.vm_id,
                host=record.host,
                attempts=attempts,
                last_persisted_age_s=age,
                versions=vm.versions,
                trigger=StopTrigger(record.data["trigger"]),
                workflow_id=record.id,
                reason=reason[:1024],
            ),
            record.vm_id,
        )
        log.warning(
            "final state not retrieved; destroying anyway",
            vm_id=record.vm_id,
            attempts=attempts,
            reason=reason,
            last_persisted_age_s=age,
        )

    async def _finish(self, record: WorkflowRecord) -> WorkflowResult:
        retrieved = record.data.get("retrieved") == "true"
        removed = record.data.get("removed", "false") == "true"
        trigger = StopTrigger(record.data["trigger"])
        await self._gateway.publish(
            VmRetired(
                vm_id=record.vm_id,
                host=record.host,
                retrieved=retrieved,
                trigger=trigger,
                removed=removed,
            ),
            record.vm_id,
        )
        return WorkflowResult.of(
            StopVmReply(
                ok=True,
                was_running=True,
                host=record.host,
                trigger=trigger,
                retrieved=retrieved,
                attempts=record.attempts,
                removed=removed,
                # An adopted VM's domain stays defined: it is its manager's.
                kept=record.data.get("kept") == "true",
            )
        )

    async def _host_lost(self, host: str) -> bool:
        record = await self._hosts.host(host)
        return record is not None and record.lost_at is not None

    async def _command_ok(self, action: str, record: WorkflowRecord, command: HostCommand) -> bool:
        result = await command(record.vm_id, record.host)
        if not result.ok:
            log.warning(
                f"{action} failed", vm_id=record.vm_id, host=record.host, reason=result.error
            )
        return bool(result.ok)
