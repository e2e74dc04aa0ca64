"""``vm.stop``, and the stops a host reports on its own: start the stop workflow, or join the
one already in progress, so a VM is never stopped twice at once."""

from __future__ import annotations

import time

import structlog

from keeper_policy.stop.plan import StopBounds
from keeper_policy.stop.workflow import STOP, new_stop
from keeper_policy.storage.vm_registry import PolicyRegistry, UnknownVmError
from keeper_policy.workflows.engine import WorkflowEngine
from keeper_shared.messages.placement import StopMode, StopTrigger, StopVm
from keeper_shared.messages.replies import StopVmReply
from keeper_shared.messages.vm import StopReason, VmStopped

log = structlog.get_logger(__name__)

EVENT_TRIGGERS = {
    StopReason.SHUTDOWN: StopTrigger.GUEST_SHUTDOWN,
    StopReason.CRASHED: StopTrigger.CRASHED,
    StopReason.DESTROYED: StopTrigger.DESTROYED,
}
"""Stops a host reports without a ``vm.stop``, after which policy retrieves and undefines.
`saved` (managed save) and `from_snapshot` keep the VM on its host; `migrated` moves it. A
stop the host missed and libvirt kept no reason for is ``found-stopped``."""


class Stopper:
    """Carries out ``vm.stop`` and the stops hosts report."""

    def __init__(
        self,
        registry: PolicyRegistry,
        engine: WorkflowEngine,
        bounds: StopBounds,
        *,
        lease_s: float,
    ) -> None:
        self._registry = registry
        self._engine = engine
        self._bounds = bounds
        self._lease_s = lease_s

    async def stop(self, request: StopVm) -> StopVmReply:
        """Stop a VM keeping its final state; a stop already running (from this request's
        first delivery, or from the host's report) is joined, not repeated."""
        record = await self._engine.current(request.vm_id)
        if record is None:
            try:
                vm = await self._registry.vm(request.vm_id)
            except UnknownVmError as error:
                return StopVmReply.failed(str(error))
            if vm.host is None:
                return StopVmReply(ok=True, was_running=False)
            shutdown = request.mode is StopMode.SHUTDOWN
            trigger = StopTrigger.SHUTDOWN if shutdown else StopTrigger.POWEROFF
            record, created = await self._engine.start(
                new_stop(request.vm_id, vm.host, trigger, self._bounds)
            )
        else:
            created = False
        if record.kind != STOP:
            return StopVmReply.failed(f"a {record.kind} of this VM is in progress")
        if not created:
            log.info(
                "joining the stop in progress",
                vm_id=request.vm_id,
                step=record.step,
                trigger=record.data.get("trigger"),
            )
        # Waits a little past the workflow's own bound: it ends by then, here or elsewhere.
        timeout = max(1.0, record.deadline - time.time()) + 2 * self._lease_s
        result = await self._engine.run_to_end(record, timeout)
        if result is None:
            return StopVmReply.failed("the stop is still in progress; ask again")
        return result.reply(StopVmReply)

    async def stopped_on_its_own(self, event: VmStopped, reported_at: float) -> None:
        """A domain stopped without a ``vm.stop`` (the guest shut down, it crashed, someone
        destroyed it): retrieve its final state before the domain goes. ``reported_at`` is
        when the host sent the report."""
        trigger = EVENT_TRIGGERS.get(event.reason)
        if trigger is None and event.missed and event.reason is StopReason.UNKNOWN:
            # Found off after the host or libvirtd was down, with no reason kept: it stopped,
            # and its state is still on the host until the domain goes.
            trigger = StopTrigger.FOUND_STOPPED
        if trigger is None:
            return
        placement = await self._registry.placement(event.vm_id)
        if placement.host != event.host:
            return  # not placed there (fenced, or a stop already unplaced it): not ours
        if placement.placed_at is not None and reported_at < placement.placed_at:
            return  # a late report about an earlier run of the VM on this host
        _, created = await self._engine.start(
            new_stop(event.vm_id, event.host, trigger, self._bounds)
        )
        if created:
            log.info(
                "VM stopped on its own; retrieving before undefine",
                vm_id=event.vm_id,
                host=event.host,
                trigger=trigger.value,
            )
            self._engine.spawn(event.vm_id)
