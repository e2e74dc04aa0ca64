"""A snapshot with memory as a workflow: pause the VM, retrieve its TPM and NVRAM state
while it is frozen, pin that state in the store under the snapshot's name, take the libvirt
snapshot (memory included), resume; the snapshot's libvirt XML is kept (memory_records) so
``vm.revert`` can go back to it even after the domain was undefined.

While the guest is paused nothing runs that could use the TPM, so the state retrieved, and
the version pinned, is exactly the state at the pause: the one the memory image expects
(oVirt disabled memory snapshots of TPM VMs because it could not promise this). Every
failure still resumes the VM; the resume is retried within the attempt bound, and a replica
resuming the workflow after a crash repeats steps that are all idempotent.
"""

from __future__ import annotations

import enum
import json
import time

import structlog

from keeper_policy.gateway import Gateway
from keeper_policy.snapshot.memory_records import MemorySnapshot, MemorySnapshots
from keeper_policy.stop.plan import StopBounds, may_retrieve
from keeper_policy.workflows.engine import LeaseLostError, SaveProgress, StepOutcome
from keeper_policy.workflows.store import WorkflowRecord, WorkflowResult
from keeper_shared.bus.topology import STATE_STORE
from keeper_shared.messages.commands import CommandOutcome
from keeper_shared.messages.replies import (
    CreateSnapshotReply,
    ResumeVmReply,
    SnapshotDomainReply,
    SnapshotVmReply,
    SuspendVmReply,
)
from keeper_shared.messages.snapshot import CreateSnapshot
from keeper_shared.messages.types import StateKind
from keeper_shared.messages.vm_control import ResumeVm, SnapshotDomain, SuspendVm
from keeper_shared.messages.vm_snapshot import SnapshotMode, VmSnapshotted

log = structlog.get_logger(__name__)

SNAPSHOT = "snapshot"
"""The workflow kind."""


class SnapshotStep(enum.StrEnum):
    """Where a snapshot with memory is."""

    SUSPEND = "suspend"
    RETRIEVE = "retrieve"
    PIN = "pin"
    DOMAIN_SNAPSHOT = "domain-snapshot"
    RESUME = "resume"
    DONE = "done"


def new_memory_snapshot(
    vm_id: str, host: str, snapshot_id: str, bounds: StopBounds
) -> WorkflowRecord:
    """A snapshot with memory of the VM on ``host``, not started yet."""
    bound = (
        bounds.retrieve_attempts * (bounds.retrieve_timeout_s + bounds.host_command_timeout_s)
        + 3 * bounds.host_command_timeout_s
    ) * 1.2 + 5.0
    return WorkflowRecord.new(
        vm_id, SNAPSHOT, SnapshotStep.SUSPEND.value, host, bound, snapshot_id=snapshot_id
    )


class SnapshotRunner:
    """Steps of the snapshot-with-memory workflow."""

    def __init__(self, gateway: Gateway, bounds: StopBounds, records: MemorySnapshots) -> None:
        self._gateway = gateway
        self._bounds = bounds
        self._records = records

    async def step(self, record: WorkflowRecord, save: SaveProgress) -> StepOutcome:
        """Run the current step; return the record advanced to the next one."""
        step = SnapshotStep(record.step)
        vm_id, host = record.vm_id, record.host
        snapshot_id = record.data["snapshot_id"]
        if step is SnapshotStep.DONE:
            return StepOutcome(record, await self._finish(record))
        if step is SnapshotStep.RESUME:
            return StepOutcome(await self._resume(record, save))
        if step is SnapshotStep.RETRIEVE:
            return StepOutcome(await self._retrieve(record, save))
        if step is SnapshotStep.SUSPEND:
            done: CommandOutcome = await self._gateway.host(
                host, SuspendVm(vm_id=vm_id), SuspendVmReply, vm_id
            )
            following = SnapshotStep.RETRIEVE
            error = f"pause failed: {done.error}"
        elif step is SnapshotStep.PIN:
            pinned = await self._gateway.call(
                STATE_STORE,
                CreateSnapshot(vm_id=vm_id, snapshot_id=snapshot_id),
                CreateSnapshotReply,
                vm_id,
                self._gateway.host_timeout_s,
            )
            done = pinned
            following = SnapshotStep.DOMAIN_SNAPSHOT
            error = f"pinning the state failed: {pinned.error}"
            if pinned.ok:
                versions = {kind.value: version for kind, version in pinned.versions.items()}
                record = record.advanced(data={"versions": json.dumps(versions)})
        else:
            versions = json.loads(record.data.get("versions", "{}"))
            pinned_text = ", ".join(
                f"{kind} v{version}" for kind, version in sorted(versions.items())
            )
            taken = await self._gateway.host(
                host,
                SnapshotDomain(
                    vm_id=vm_id,
                    snapshot_id=snapshot_id,
                    description=f"vTPM Keeper: TPM/NVRAM pinned as {snapshot_id} ({pinned_text})",
                ),
                SnapshotDomainReply,
                vm_id,
            )
            done = taken
            following = SnapshotStep.RESUME
            error = f"the libvirt snapshot failed (TPM/NVRAM stay pinned): {taken.error}"
            if taken.ok:
                record = record.advanced(data={"snapshot_xml": taken.snapshot_xml or ""})
        if done.ok:
            return StepOutcome(record.advanced(step=following.value, attempts=0))
        log.warning(
            "snapshot step failed; resuming the VM", vm_id=vm_id, step=step.value, reason=done.error
        )
        return StepOutcome(
            record.advanced(step=SnapshotStep.RESUME.value, attempts=0, data={"error": error})
        )

    async def _retrieve(self, record: WorkflowRecord, save: SaveProgress) -> WorkflowRecord:
        attempts = record.attempts
        if may_retrieve(attempts, self._bounds, out_of_time=time.time() > record.deadline):
            attempts += 1
            if not await save(record.advanced(attempts=attempts)):
                raise LeaseLostError(record.vm_id)
            result = await self._gateway.retrieve(record.vm_id, record.host)
            if result.ok:
                log.info(
                    "state retrieved while paused", vm_id=record.vm_id, versions=result.versions
                )
                return record.advanced(step=SnapshotStep.PIN.value, attempts=0)
        if may_retrieve(attempts, self._bounds, out_of_time=time.time() > record.deadline):
            return record.advanced(attempts=attempts)  # try again
        error = "the state could not be retrieved while the VM was paused; no snapshot taken"
        return record.advanced(step=SnapshotStep.RESUME.value, attempts=0, data={"error": error})

    async def _resume(self, record: WorkflowRecord, save: SaveProgress) -> WorkflowRecord:
        attempts = record.attempts + 1
        if not await save(record.advanced(attempts=attempts)):
            raise LeaseLostError(record.vm_id)
        done = await self._gateway.host(
            record.host, ResumeVm(vm_id=record.vm_id), ResumeVmReply, record.vm_id
        )
        if done.ok:
            return record.advanced(step=SnapshotStep.DONE.value, attempts=attempts)
        if attempts < self._bounds.retrieve_attempts:
            return record.advanced(attempts=attempts)
        log.error(
            "VM left paused: resume failed", vm_id=record.vm_id, host=record.host, reason=done.error
        )
        problem = f"the VM could not be resumed and is paused on {record.host}: {done.error}"
        earlier = record.data.get("error")
        return record.advanced(
            step=SnapshotStep.DONE.value,
            data={"error": f"{earlier}; {problem}" if earlier else problem},
        )

    async def _finish(self, record: WorkflowRecord) -> WorkflowResult:
        error = record.data.get("error")
        if error:
            return WorkflowResult.of(SnapshotVmReply.failed(error))
        versions = {StateKind(k): int(v) for k, v in json.loads(record.data["versions"]).items()}
        snapshot_id = record.data["snapshot_id"]
        if record.data.get("snapshot_xml"):
            await self._records.save(
                record.vm_id,
                MemorySnapshot(
                    snapshot_id=snapshot_id,
                    host=record.host,
                    snapshot_xml=record.data["snapshot_xml"],
                ),
            )
        await self._gateway.publish(
            VmSnapshotted(
                vm_id=record.vm_id,
                snapshot_id=snapshot_id,
                mode=SnapshotMode.MEMORY,
                versions=versions,
                host=record.host,
            ),
            record.vm_id,
        )
        return WorkflowResult.of(
            SnapshotVmReply(ok=True, mode=SnapshotMode.MEMORY, versions=versions)
        )
