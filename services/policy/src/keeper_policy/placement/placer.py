"""``vm.place``: the checks that decide whether a VM may go to a host (and whether the
domain its manager handed over agrees with its approval, see manager_domain), then the
placement workflow (see workflow) that fences, restores, starts and records.

A request for a placement already in progress joins it (a redelivery after a replica died,
or a client retrying), so a VM is never placed twice at once.
"""

from __future__ import annotations

import time

import structlog

from keeper_policy.hosts.registry import HostRegistry
from keeper_policy.placement.manager_domain import DomainCheck, check_manager_domain
from keeper_policy.placement.rules import (
    check_current_placement,
    check_state_format,
    check_swtpm_version,
    check_tpm_secrets,
    machine_problems,
    target_problems,
)
from keeper_policy.placement.workflow import PLACE, new_place
from keeper_policy.settings import PolicySettings
from keeper_policy.snapshot.memory_records import MemorySnapshot
from keeper_policy.storage.vm_registry import PolicyRegistry, UnknownVmError, VmRecord
from keeper_policy.templates.records import TemplateRecords
from keeper_policy.templates.spec import start_refusal
from keeper_policy.workflows.engine import WorkflowEngine
from keeper_policy.workflows.store import WorkflowRecord, WorkflowStore
from keeper_shared.messages.placement import PlaceVm
from keeper_shared.messages.replies import PlaceVmReply

log = structlog.get_logger(__name__)


class Placer:
    """Carries out ``vm.place``."""

    def __init__(
        self,
        settings: PolicySettings,
        registry: PolicyRegistry,
        hosts: HostRegistry,
        workflows: WorkflowStore,
        engine: WorkflowEngine,
        templates: TemplateRecords,
    ) -> None:
        self._settings = settings
        self._templates = templates
        self._registry = registry
        self._hosts = hosts
        self._workflows = workflows
        self._engine = engine

    def bound_s(self) -> float:
        """How long a placement may take: restore and start at their bounds, a few
        heartbeats to confirm a start, and slack for the writes in between."""
        return 3 * self._settings.host_command_timeout_s + 30.0

    async def place(
        self, request: PlaceVm, *, revert_to: MemorySnapshot | None = None
    ) -> PlaceVmReply:
        """Check, then run (or join) the placement workflow; a refusal says why. With
        ``revert_to`` the host reverts the domain to that snapshot instead of starting it."""
        vm_id, host = request.vm_id, request.host
        running = await self._workflows.load(vm_id)
        if running is not None:
            if running.kind == PLACE and running.host == host:
                log.info("joining the placement in progress", vm_id=vm_id, step=running.step)
                return await self._finish(running)
            return PlaceVmReply.failed(
                f"a {running.kind} of this VM is in progress on {running.host}"
            )
        try:
            vm = await self._registry.vm(vm_id)
        except UnknownVmError as error:
            template = await self._templates.template(vm_id)
            if template is not None:
                log.info("refused to place a template", template_id=vm_id, host=host)
                return PlaceVmReply.failed(start_refusal(template))
            return PlaceVmReply.failed(str(error))
        now = time.time()
        target = await self._hosts.host(host)
        refusals = target_problems(
            target, host, now=now, lost_after_s=self._settings.host_lost_after_s
        )
        domain = manager_domain(request, vm)
        if domain is not None:
            refusals += domain.reasons
        if vm.host == host and not refusals:
            if domain is not None and domain.xml != vm.domain_xml:
                return PlaceVmReply.failed(
                    f"the VM already runs on {host} under another definition; stop it "
                    "to start it with this one"
                )
            # A repeated request: the VM already runs there (invariant 8).
            return PlaceVmReply(ok=True, epoch=vm.epoch, already_placed=True)
        current = await self._hosts.host(vm.host) if vm.host else None
        moving = check_current_placement(vm.host, current, host)
        if moving is not None:
            refusals.append(moving)
        overridden: str | None = None
        if target is not None:
            refusals += machine_problems(target, host, vm.spec)
            state_format = check_state_format(target, host, vm.state_profile)
            if state_format is not None:
                refusals.append(state_format)
            secrets = check_tpm_secrets(target, host, encrypt_tpm_state=vm.spec.encrypt_tpm_state)
            if secrets is not None:
                refusals.append(secrets)
            if target.capabilities.swtpm_version is not None:
                version = check_swtpm_version(
                    host_id=host,
                    host_swtpm=target.capabilities.swtpm_version,
                    last_swtpm=vm.swtpm_version,
                    last_host=vm.last_host,
                    override=request.override_version,
                )
                if version.refusal is not None:
                    refusals.append(version.refusal)
                overridden = version.overridden
        if refusals or target is None:
            # Nothing has changed yet: the VM stays where it was, and every reason is given
            # so the operator fixes them all at once.
            log.info("placement refused", vm_id=vm_id, host=host, reasons=refusals)
            return PlaceVmReply.failed("; ".join(refusals))
        record, created = await self._engine.start(
            new_place(
                request,
                expected_host=vm.host,
                swtpm=target.capabilities.swtpm_version,
                overridden=overridden,
                bound_s=self.bound_s(),
                lost_before=await self._registry.lost_mark(vm_id),
                domain_xml=domain.xml if domain is not None else None,
                kvm=target.capabilities.kvm,
                revert_to=revert_to,
            )
        )
        if not created and (record.kind != PLACE or record.host != host):
            return PlaceVmReply.failed(
                f"a {record.kind} of this VM is in progress on {record.host}"
            )
        return await self._finish(record)

    async def _finish(self, record: WorkflowRecord) -> PlaceVmReply:
        timeout = max(1.0, record.deadline - time.time()) + 2 * self._settings.workflow_lease_s
        result = await self._engine.run_to_end(record, timeout)
        if result is None:
            return PlaceVmReply.failed("the placement is still in progress; ask again")
        return result.reply(PlaceVmReply)


def manager_domain(request: PlaceVm, vm: VmRecord) -> DomainCheck | None:
    """The VM manager's domain this placement defines, checked: the one in the request, else
    the one kept from an earlier start (checked again: a new approval may conflict with it);
    None when neither exists and policy's template is used."""
    domain_xml = request.domain_xml if request.domain_xml is not None else vm.domain_xml
    if domain_xml is None:
        return None
    return check_manager_domain(domain_xml, vm.spec, vm.tpm_xml)
