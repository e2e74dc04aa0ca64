"""Placing a VM as a workflow: fence (new epoch on the target host), restore (the store
puts the state in place there), start, record. A failed restore or start undoes the
placement so the VM can be placed again at once.

An undone placement leaves the VM as it was before, but for its epoch: it runs nowhere
(also when it was taken from a lost host, which is not put back: the new epoch fenced that
host, so the VM could no longer be protected there), and a loss
recorded on the target meanwhile (its agent died, and the loss was declared while the
restore or start waited for it) is taken back: the host never reported the VM running under
the new epoch, so nothing of it can have been lost there. The epoch stays raised: a
timed-out prepare or start may have reached the agent before it died, or may wait in its
queue for it to come back, and a host that writes under that epoch must stay fenced; an
epoch number used twice would let it write into the VM's next placement there.

Being a workflow, a placement survives its replica dying: another one resumes it at the
recorded step, and a repeated request joins it instead of starting a second one. A step
that may already have happened before the crash (the domain may be running) is first
checked against the host's own report: a heartbeat newer than the step that lists the VM
under this placement's epoch means it is running.
"""

from __future__ import annotations

import asyncio
import enum
import json
import time

import structlog
from pydantic import ValidationError

from keeper_policy.gateway import Gateway
from keeper_policy.hosts.registry import HostRegistry
from keeper_policy.placement.domain_definition import domain_xml, with_tpm_encryption
from keeper_policy.placement.manager_domain import stamp_for_start
from keeper_policy.settings import PolicySettings
from keeper_policy.snapshot.memory_records import MemorySnapshot
from keeper_policy.storage.vm_registry import (
    LostMark,
    PlacementConflictError,
    PolicyRegistry,
    VmRecord,
)
from keeper_policy.workflows.engine import LeaseLostError, SaveProgress, StepOutcome
from keeper_policy.workflows.store import WorkflowRecord, WorkflowResult
from keeper_shared.bus.topology import STATE_STORE
from keeper_shared.messages.commands import CommandOutcome
from keeper_shared.messages.placement import PlaceVm, VmPlaced
from keeper_shared.messages.replies import (
    PlaceVmReply,
    RestoreStateReply,
    RevertDomainReply,
    StartVmReply,
)
from keeper_shared.messages.state import RestoreState
from keeper_shared.messages.vm import StartVm
from keeper_shared.messages.vm_control import RevertDomain

log = structlog.get_logger(__name__)

PLACE = "place"
"""The workflow kind."""

HEARTBEATS_TO_WAIT = 3
"""How many heartbeat intervals a resumed step waits for the host's report."""


class PlaceStep(enum.StrEnum):
    """Where a placement is."""

    FENCE = "fence"
    RESTORE = "restore"
    START = "start"
    RECORD = "record"
    UNDO = "undo"
    DONE = "done"


def new_place(
    request: PlaceVm,
    *,
    expected_host: str | None,
    swtpm: str | None,
    overridden: str | None,
    bound_s: float,
    lost_before: LostMark,
    domain_xml: str | None = None,
    kvm: bool = False,
    revert_to: MemorySnapshot | None = None,
) -> WorkflowRecord:
    """A placement of ``request.vm_id`` on ``request.host``, not started yet, that defines
    ``domain_xml`` (the manager's domain, checked) or else policy's template (with KVM when
    the host runs it); ``lost_before`` is the VM's loss mark, put back if it is undone.
    With ``revert_to`` the domain is not started but reverted to that snapshot with memory
    (``vm.revert``: the request restores the snapshot's pinned state)."""
    return WorkflowRecord.new(
        request.vm_id,
        PLACE,
        PlaceStep.FENCE.value,
        request.host,
        bound_s,
        # The manager's XML as given is not needed again: the checked one is kept below.
        request=request.model_copy(update={"domain_xml": None}).model_dump_json(),
        expected_host=expected_host or "",
        swtpm=swtpm or "",
        version_overridden=overridden or "",
        domain_xml=domain_xml or "",
        kvm="true" if kvm else "",
        lost_from_before=lost_before.host or "",
        recovery_point_before=lost_before.recovery_point or "",
        revert_to=revert_to.model_dump_json() if revert_to is not None else "",
    )


class PlaceRunner:
    """Steps of the placement workflow."""

    def __init__(
        self,
        settings: PolicySettings,
        gateway: Gateway,
        registry: PolicyRegistry,
        hosts: HostRegistry,
    ) -> None:
        self._settings = settings
        self._gateway = gateway
        self._registry = registry
        self._hosts = hosts

    async def step(self, record: WorkflowRecord, save: SaveProgress) -> StepOutcome:
        """Run the current step; return the record advanced to the next one."""
        step = PlaceStep(record.step)
        if step is PlaceStep.DONE:
            return StepOutcome(record, self._result(record))
        if step is PlaceStep.FENCE:
            return StepOutcome(await self._fence(record))
        if step is PlaceStep.RECORD:
            return StepOutcome(await self._record(record))
        if step is PlaceStep.UNDO:
            await self._undo(record)
            # The start may yet happen (a slow host): it removes the domain when it reports it.
            await self._hosts.add_cleanup(record.host, [record.vm_id])
            return StepOutcome(record.advanced(step=PlaceStep.DONE.value))
        # RESTORE and START may have happened before a crash: ask the host first.
        epoch = int(record.data["epoch"])
        if record.attempts > 0 and await self._running_there(record, epoch):
            return StepOutcome(record.advanced(step=PlaceStep.RECORD.value, attempts=0))
        began = time.time()
        progress = record.advanced(attempts=record.attempts + 1, data={"step_began": repr(began)})
        if not await save(progress):
            raise LeaseLostError(record.vm_id)
        if step is PlaceStep.RESTORE:
            return StepOutcome(await self._restore(progress, epoch))
        return StepOutcome(await self._start(progress, epoch))

    async def _fence(self, record: WorkflowRecord) -> WorkflowRecord:
        expected = record.data["expected_host"] or None
        try:
            epoch = await self._registry.place(record.vm_id, record.host, expected_host=expected)
        except PlacementConflictError as error:
            placement = await self._registry.placement(record.vm_id)
            if placement.host != record.host:
                return record.advanced(step=PlaceStep.DONE.value, data={"error": str(error)})
            epoch = placement.epoch  # fenced before a crash: carry on under that epoch
        if expected is not None:
            log.warning(
                "VM taken from a lost host", vm_id=record.vm_id, lost_host=expected, epoch=epoch
            )
        return record.advanced(step=PlaceStep.RESTORE.value, attempts=0, data={"epoch": str(epoch)})

    async def _restore(self, record: WorkflowRecord, epoch: int) -> WorkflowRecord:
        request = PlaceVm.model_validate_json(record.data["request"])
        vm = await self._registry.vm(record.vm_id)
        restore = await self._gateway.call(
            STATE_STORE,
            RestoreState(
                vm_id=record.vm_id,
                name=vm.spec.name,
                host=record.host,
                epoch=epoch,
                versions=request.versions,
                snapshot_id=request.snapshot_id,
                allow_older=request.allow_older,
                encrypt_tpm_state=vm.spec.encrypt_tpm_state,
            ),
            RestoreStateReply,
            record.vm_id,
            self._settings.host_command_timeout_s,
        )
        if not restore.ok:
            error = f"prepare on {record.host} failed: {restore.error}"
            return record.advanced(step=PlaceStep.UNDO.value, data=_failure(error, restore))
        return record.advanced(
            step=PlaceStep.START.value, attempts=0, data={"restored": restore.model_dump_json()}
        )

    async def _start(self, record: WorkflowRecord, epoch: int) -> WorkflowRecord:
        vm = await self._registry.vm(record.vm_id)
        # The store names the secret it put on the host with the state: the domain's TPM
        # must name the same one, or swtpm cannot read (or would not encrypt) its state.
        secret_uuid = _restored(record).tpm_secret_uuid
        xml = self._domain_xml(record, vm, epoch, secret_uuid)
        revert_to = record.data.get("revert_to")
        started: StartVmReply | RevertDomainReply
        if revert_to:
            snapshot = MemorySnapshot.model_validate_json(revert_to)
            revert = RevertDomain(
                vm_id=record.vm_id,
                epoch=epoch,
                domain_xml=xml,
                snapshot_id=snapshot.snapshot_id,
                snapshot_xml=snapshot.snapshot_xml,
            )
            started = await self._gateway.host(record.host, revert, RevertDomainReply, record.vm_id)
        else:
            start = StartVm(vm_id=record.vm_id, epoch=epoch, domain_xml=xml)
            started = await self._gateway.host(record.host, start, StartVmReply, record.vm_id)
        # A start repeated after a crash is refused by a host that already runs the domain,
        # and a start that timed out may yet have happened: the host's report decides.
        unsure = record.attempts > 1 or started.timed_out
        if started.ok or (unsure and await self._running_there(record, epoch)):
            return record.advanced(step=PlaceStep.RECORD.value, attempts=0)
        error = f"start on {record.host} failed: {started.error}"
        return record.advanced(step=PlaceStep.UNDO.value, data=_failure(error, started))

    async def _record(self, record: WorkflowRecord) -> WorkflowRecord:
        epoch = int(record.data["epoch"])
        swtpm = record.data["swtpm"] or None
        overridden = record.data["version_overridden"] or None
        domain_xml = record.data.get("domain_xml") or None
        await self._registry.note_placed(record.vm_id, record.host, swtpm, domain_xml)
        await self._gateway.publish(
            VmPlaced(
                vm_id=record.vm_id,
                host=record.host,
                epoch=epoch,
                swtpm_version=swtpm,
                version_overridden=overridden,
            ),
            record.vm_id,
        )
        log.info(
            "VM placed", vm_id=record.vm_id, host=record.host, epoch=epoch, overridden=overridden
        )
        return record.advanced(step=PlaceStep.DONE.value)

    async def _undo(self, record: WorkflowRecord) -> None:
        """The VM runs nowhere; a loss recorded on the target meanwhile is taken back unless
        the host's last report lists the VM under this placement's epoch (then it ran there,
        and what it wrote after the last persist may be lost: the mark stays)."""
        epoch = int(record.data.get("epoch") or 0)
        host = await self._hosts.host(record.host)
        if host is not None and epoch > 0 and host.inventory.get(record.vm_id) == epoch:
            await self._registry.unplace(record.vm_id, record.host)
            return
        before = LostMark(
            record.data.get("lost_from_before") or None,
            record.data.get("recovery_point_before") or None,
        )
        await self._registry.undo_place(record.vm_id, record.host, before)

    def _result(self, record: WorkflowRecord) -> WorkflowResult:
        error = record.data.get("error")
        if error:
            # A step that got no answer in time is told as such: the requester (the CLI
            # exits 6) knows a host may yet have acted on it.
            timed_out = record.data.get("timed_out") == "true"
            return WorkflowResult.of(PlaceVmReply.failed(error, timed_out=timed_out))
        restored = _restored(record)
        return WorkflowResult.of(
            PlaceVmReply(
                ok=True,
                epoch=int(record.data["epoch"]),
                versions=restored.versions,
                tpm_secret_uuid=restored.tpm_secret_uuid,
                version_overridden=record.data["version_overridden"] or None,
            )
        )

    async def _running_there(self, record: WorkflowRecord, epoch: int) -> bool:
        """Whether the host reports the VM under ``epoch`` in a heartbeat sent after the
        current step began (waits a few heartbeat intervals for one)."""
        since = float(record.data.get("step_began", "0"))
        waited_from = time.monotonic()
        while True:
            host = await self._hosts.host(record.host)
            if host is None or host.lost_at is not None:
                return False
            if host.last_seen > since:
                return host.inventory.get(record.vm_id) == epoch
            if time.monotonic() - waited_from > HEARTBEATS_TO_WAIT * host.interval_s:
                return False
            await asyncio.sleep(min(0.2, host.interval_s / 4))

    def _domain_xml(
        self, record: WorkflowRecord, vm: VmRecord, epoch: int, tpm_secret_uuid: str | None
    ) -> str:
        """The manager's domain when it handed one over, else policy's template."""
        manager_xml = record.data.get("domain_xml")
        if manager_xml:
            return stamp_for_start(manager_xml, epoch=epoch, tpm_secret_uuid=tpm_secret_uuid)
        secure = vm.spec.secure_boot
        tpm_xml = vm.tpm_xml
        if tpm_secret_uuid is not None:
            tpm_xml = with_tpm_encryption(tpm_xml, tpm_secret_uuid)
        return domain_xml(
            vm.spec,
            tpm_xml=tpm_xml,
            epoch=epoch,
            kvm=record.data.get("kvm") == "true",
            ovmf_code=self._settings.ovmf_secure_code if secure else self._settings.ovmf_code,
            ovmf_vars_template=(
                self._settings.ovmf_secure_vars_template
                if secure
                else self._settings.ovmf_vars_template
            ),
        )


def _failure(error: str, reply: CommandOutcome) -> dict[str, str]:
    """What a failed step records for the result: why, and whether it was a time-out."""
    return {"error": error, "timed_out": "true" if reply.timed_out else ""}


def _restored(record: WorkflowRecord) -> RestoreStateReply:
    """What the restore step put on the host (nothing yet before it)."""
    saved = record.data.get("restored")
    if not saved:
        return RestoreStateReply(ok=True)
    try:
        return RestoreStateReply.model_validate_json(saved)
    except ValidationError:
        # Saved by a replica of the previous version (a string map), which an upgrade may
        # leave mid-placement: only the secret matters to the steps still to come.
        old = json.loads(saved)
        return RestoreStateReply(ok=True, tpm_secret_uuid=old.get("tpm_secret_uuid"))
