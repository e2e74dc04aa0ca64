"""``template.create``, ``template.delete``, ``templates.list`` and
``vm.create-from-template``.

A template's NVRAM is copied by the store with ``vm.clone --tpm fresh``, which copies the
NVRAM only: a TPM state cannot reach a template, nor a template's VM, by construction. A VM
made from a template has its NVRAM copied before it is approved, so it is never registered
without it (a start in between would boot the firmware's blank NVRAM, losing the enrolled
keys); a rejected VM's copy is deleted again.
"""

from __future__ import annotations

from datetime import UTC, datetime

import structlog

from keeper_policy.gateway import Gateway
from keeper_policy.storage.vm_registry import PolicyRegistry, UnknownVmError
from keeper_policy.templates.records import TemplateRecords
from keeper_policy.templates.spec import template_spec, vm_spec
from keeper_policy.tpm.approver import Approver
from keeper_shared.bus.client import Delivery, Route
from keeper_shared.bus.topology import STATE_STORE
from keeper_shared.messages.deletion import DeleteState
from keeper_shared.messages.envelope import Envelope
from keeper_shared.messages.replies import (
    CloneVmReply,
    CreateVmFromTemplateReply,
    DeleteStateReply,
    DeleteTemplateReply,
)
from keeper_shared.messages.template import (
    CreateTemplate,
    CreateVmFromTemplate,
    DeleteTemplate,
    ListTemplates,
    TemplateCreated,
    TemplatesListed,
    TemplateView,
)
from keeper_shared.messages.tpm import EnableTpm, VmSpec
from keeper_shared.messages.transfer import CloneTpm, CloneVm
from keeper_shared.messages.types import StateKind

log = structlog.get_logger(__name__)


class TemplateHandlers:
    """Carries out the template commands."""

    def __init__(
        self,
        records: TemplateRecords,
        registry: PolicyRegistry,
        approver: Approver,
        gateway: Gateway,
        *,
        store_timeout_s: float,
        store_target: str = STATE_STORE,
    ) -> None:
        self._records = records
        self._registry = registry
        self._approver = approver
        self._gateway = gateway
        self._store_timeout_s = store_timeout_s
        self._store = store_target

    def command_routes(self) -> list[Route]:
        """Routes of the template commands on policy's commands queue."""
        return [
            Route(CreateTemplate, self.on_create),
            Route(DeleteTemplate, self.on_delete),
            Route(ListTemplates, self.on_list),
            Route(CreateVmFromTemplate, self.on_create_vm),
        ]

    async def on_list(
        self, envelope: Envelope[ListTemplates], delivery: Delivery
    ) -> TemplatesListed:
        """Every template, by name."""
        return TemplatesListed(templates=await self._records.all())

    async def on_create(
        self, envelope: Envelope[CreateTemplate], delivery: Delivery
    ) -> TemplateCreated:
        """Create a template from a VM (its NVRAM copied) or from a spec."""
        request = envelope.data
        existing = await self._records.template(request.template_id)
        if existing is not None:
            if existing.name == request.name:
                return TemplateCreated(template=existing)  # a repeat of this request
            return TemplateCreated(
                error=f"template {request.template_id} exists as {existing.name!r}"
            )
        source_spec = request.spec
        if request.from_vm_id is not None:
            try:
                source_spec = (await self._registry.vm(request.from_vm_id)).spec
            except UnknownVmError as error:
                return TemplateCreated(error=str(error))
        assert source_spec is not None  # CreateTemplate has a VM or a spec
        holder = await self._records.holder_of(request.name)
        if holder is not None:
            return TemplateCreated(error=f"a template named {request.name!r} exists ({holder})")
        if request.from_vm_id is not None:
            copied = await self._copy_nvram(request.from_vm_id, request.template_id)
            if not copied.ok:
                return TemplateCreated(
                    error=f"the NVRAM of VM {request.from_vm_id} was not copied: {copied.error}"
                )
        template = TemplateView(
            template_id=request.template_id,
            name=request.name,
            spec=template_spec(source_spec, request.template_id, request.name),
            source_vm_id=request.from_vm_id,
            nvram=request.from_vm_id is not None,
            created_at=datetime.now(UTC),
        )
        holder = await self._records.save(template)
        if holder is not None:
            # Another replica created a template of this name meanwhile.
            if template.nvram:
                await self._drop_copy(template.template_id)
            return TemplateCreated(error=f"a template named {request.name!r} exists ({holder})")
        log.info(
            "template created",
            template_id=template.template_id,
            source_vm_id=template.source_vm_id,
            nvram=template.nvram,
        )
        return TemplateCreated(template=template)

    async def on_delete(
        self, envelope: Envelope[DeleteTemplate], delivery: Delivery
    ) -> DeleteTemplateReply:
        """Delete the template's NVRAM copy in the store, then the template."""
        template_id = envelope.data.template_id
        template = await self._records.template(template_id)
        if template is None:
            return DeleteTemplateReply.failed(f"there is no template {template_id}")
        # State first: if the record went first and the deletion failed, the NVRAM copy
        # would be left under an id nothing names. A repeat deletes nothing twice.
        deleted = await self._gateway.call(
            self._store,
            DeleteState(vm_id=template_id, reason=f"template {template.name} deleted"),
            DeleteStateReply,
            template_id,
            self._store_timeout_s,
        )
        if not deleted.ok:
            return DeleteTemplateReply.failed(
                f"the store did not delete the template's NVRAM: {deleted.error}",
                timed_out=deleted.timed_out,
            )
        await self._records.delete(template)
        log.info("template deleted", template_id=template_id)
        return DeleteTemplateReply(
            ok=True,
            template_id=template_id,
            name=template.name,
            nvram_versions=deleted.deleted_versions.get(StateKind.NVRAM, 0),
        )

    async def on_create_vm(
        self, envelope: Envelope[CreateVmFromTemplate], delivery: Delivery
    ) -> CreateVmFromTemplateReply:
        """Copy the template's NVRAM to the new VM, then approve and register it."""
        request = envelope.data
        template = await self._records.template(request.template_id)
        if template is None:
            return CreateVmFromTemplateReply.failed(f"there is no template {request.template_id}")
        spec = vm_spec(template, request.vm_id, request.name)
        refusal = await self._id_refusal(spec)
        if refusal is not None:
            return CreateVmFromTemplateReply.failed(refusal)
        if template.nvram:
            copied = await self._copy_nvram(template.template_id, request.vm_id)
            if not copied.ok:
                return CreateVmFromTemplateReply.failed(
                    f"the template's NVRAM was not copied: {copied.error}",
                    timed_out=copied.timed_out,
                )
        approval = EnableTpm(
            spec=spec,
            cluster=request.cluster,
            override=request.override,
            override_guest_os=request.override_guest_os,
            allow_duplicate_name=request.allow_duplicate_name,
        )
        decided = await self._approver.approve(approval, delivery.user_id or envelope.source)
        if not decided.ok:
            if template.nvram:
                await self._drop_copy(request.vm_id)
            return CreateVmFromTemplateReply.failed(decided.error or "rejected without a reason")
        log.info(
            "VM created from a template", vm_id=request.vm_id, template_id=template.template_id
        )
        return CreateVmFromTemplateReply(
            ok=True,
            tpm_xml=decided.tpm_xml,
            guest_os_support=decided.guest_os_support,
            overridden=decided.overridden,
            template_id=template.template_id,
            nvram_copied=bool(template.nvram),
        )

    async def _id_refusal(self, spec: VmSpec) -> str | None:
        """Why the new VM's id cannot be used: a template's, or another VM's (a repeat of
        the same creation finds its own VM and goes on)."""
        if await self._records.template(spec.vm_id) is not None:
            return f"{spec.vm_id} is a template's id"
        try:
            registered = await self._registry.vm(spec.vm_id)
        except UnknownVmError:
            return None
        if registered.spec != spec:
            return f"VM {spec.vm_id} is registered already"
        return None

    async def _copy_nvram(self, source: str, target: str) -> CloneVmReply:
        """Have the store copy the newest NVRAM of ``source`` as ``target``'s first state;
        ``fresh``: the NVRAM only, never the TPM."""
        clone = CloneVm(source_vm_id=source, target_vm_id=target, tpm=CloneTpm.FRESH)
        return await self._gateway.call(
            self._store, clone, CloneVmReply, target, self._store_timeout_s
        )

    async def _drop_copy(self, vm_id: str) -> None:
        """Delete the NVRAM copied for a VM that was not approved (a best effort: what is
        left is a stored NVRAM no VM uses, that `keeper vm delete-state` removes)."""
        dropped = await self._gateway.call(
            self._store,
            DeleteState(vm_id=vm_id, reason="VM from a template not approved"),
            DeleteStateReply,
            vm_id,
            self._store_timeout_s,
        )
        if not dropped.ok:
            log.warning("NVRAM copy of a rejected VM left", vm_id=vm_id, reason=dropped.error)
