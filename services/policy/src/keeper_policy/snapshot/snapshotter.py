"""``vm.snapshot``: offline and live-without-memory snapshots are a pin of the stored
state in the store; a snapshot with memory of a running VM is the snapshot workflow."""

from __future__ import annotations

import time

import structlog

from keeper_policy.gateway import Gateway
from keeper_policy.snapshot.workflow import SNAPSHOT, new_memory_snapshot
from keeper_policy.stop.plan import StopBounds
from keeper_policy.storage.vm_registry import PolicyRegistry, UnknownVmError
from keeper_policy.workflows.engine import WorkflowEngine
from keeper_shared.bus.topology import STATE_STORE
from keeper_shared.messages.replies import CreateSnapshotReply, SnapshotVmReply
from keeper_shared.messages.snapshot import CreateSnapshot
from keeper_shared.messages.vm_snapshot import SnapshotMode, SnapshotVm, VmSnapshotted
from keeper_shared.observability import metrics

log = structlog.get_logger(__name__)


class Snapshotter:
    """Carries out ``vm.snapshot``."""

    def __init__(
        self,
        registry: PolicyRegistry,
        engine: WorkflowEngine,
        gateway: Gateway,
        bounds: StopBounds,
        lease_s: float,
    ) -> None:
        self._registry = registry
        self._engine = engine
        self._gateway = gateway
        self._bounds = bounds
        self._lease_s = lease_s

    async def snapshot(self, request: SnapshotVm) -> SnapshotVmReply:
        """Pin (offline, live) or run the memory workflow; a refusal says why."""
        vm_id = request.vm_id
        running = await self._engine.current(vm_id)
        if running is not None and not (
            running.kind == SNAPSHOT and running.data.get("snapshot_id") == request.snapshot_id
        ):
            return SnapshotVmReply.failed(f"a {running.kind} of this VM is in progress")
        try:
            vm = await self._registry.vm(vm_id)
        except UnknownVmError as error:
            return SnapshotVmReply.failed(str(error))
        if running is None and (vm.host is None or not request.memory):
            return await self._pin(request, vm.host, vm.last_persisted_at)
        record = running
        if record is None:
            assert vm.host is not None
            record, _ = await self._engine.start(
                new_memory_snapshot(vm_id, vm.host, request.snapshot_id, self._bounds)
            )
        timeout = max(1.0, record.deadline - time.time()) + 2 * self._lease_s
        result = await self._engine.run_to_end(record, timeout)
        if result is None:
            return SnapshotVmReply.failed("the snapshot is still in progress; ask again")
        return result.reply(SnapshotVmReply)

    async def _pin(
        self, request: SnapshotVm, host: str | None, persisted_at: float | None
    ) -> SnapshotVmReply:
        mode = SnapshotMode.OFFLINE if host is None else SnapshotMode.LIVE
        pinned = await self._gateway.call(
            STATE_STORE,
            CreateSnapshot(vm_id=request.vm_id, snapshot_id=request.snapshot_id),
            CreateSnapshotReply,
            request.vm_id,
            self._gateway.host_timeout_s,
        )
        if not pinned.ok:
            return SnapshotVmReply.failed(
                pinned.error or "the store gave no reason", timed_out=pinned.timed_out
            )
        versions = pinned.versions
        # A live snapshot takes what was persisted; say how far it may trail the running TPM.
        age = time.time() - persisted_at if mode is SnapshotMode.LIVE and persisted_at else None
        await self._gateway.publish(
            VmSnapshotted(
                vm_id=request.vm_id,
                snapshot_id=request.snapshot_id,
                mode=mode,
                versions=versions,
                persisted_age_s=age,
                host=host,
            ),
            request.vm_id,
        )
        log.info("snapshot pinned", vm_id=request.vm_id, mode=mode.value, persisted_age_s=age)
        if age is not None:
            metrics.RECOVERY_POINT_AGE_SECONDS.observe(age)
        return SnapshotVmReply(ok=True, mode=mode, versions=versions, persisted_age_s=age)
