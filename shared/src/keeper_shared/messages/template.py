"""VM templates: a spec with a TPM enabled and, when made from a VM, its NVRAM (the Secure
Boot keys it enrolled) — never a TPM state.

A template's TPM state copied into every VM made from it would give them all one TPM
identity (one endorsement key, each able to read what the others sealed), so a template
holds none and each VM gets a TPM manufactured on its first start, as oVirt does. Templates
are policy's records, apart from VMs: they are never listed as VMs, placed or started. The
template's NVRAM is kept by the store under the template's id like a VM's first state.
"""

from __future__ import annotations

from datetime import datetime
from typing import Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from keeper_shared.messages.envelope import Payload
from keeper_shared.messages.tpm import CLUSTER_PATTERN, DEFAULT_CLUSTER, VmSpec
from keeper_shared.messages.types import VmId, VmName


class TemplateView(BaseModel):
    """One template as policy keeps it."""

    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)

    template_id: VmId = Field(description="The template's id (a UUID, never a VM's).")
    name: VmName = Field(description="The template's name, unique among templates.")
    spec: VmSpec = Field(
        description="What each VM made from it gets: its `vm_id` and `name` are the "
        "template's own and are replaced; it has no disks and no interfaces."
    )
    source_vm_id: VmId | None = Field(
        description="The VM it was made from; None when made from a spec."
    )
    nvram: bool = Field(
        description="Whether it holds an NVRAM (copied from its VM); without one a VM made "
        "from it starts with the firmware's own NVRAM template."
    )
    created_at: datetime = Field(description="When it was created (UTC).")


class CreateTemplate(Payload):
    """Command to policy: create a template from a registered VM (its spec, and its newest
    stored NVRAM copied by the store) or from a spec (no NVRAM). Replied with
    :class:`TemplateCreated`; a repeat with the same id is answered with the template."""

    message_type = "template.create"

    template_id: VmId = Field(description="The new template's id.")
    name: VmName = Field(description="Its name; refused when another template has it.")
    from_vm_id: VmId | None = Field(
        default=None, description="The registered VM to make it from; it must have a stored NVRAM."
    )
    spec: VmSpec | None = Field(
        default=None, description="The spec to make it from (its `vm_id` and `name` ignored)."
    )

    @model_validator(mode="after")
    def _one_source(self) -> Self:
        if (self.from_vm_id is None) == (self.spec is None):
            raise ValueError("a template is made from a VM or from a spec: give exactly one")
        return self


class TemplateCreated(Payload):
    """Reply to :class:`CreateTemplate`: the template, or why there is none."""

    message_type = "template.created"

    template: TemplateView | None = Field(default=None, description="The template.")
    error: str | None = Field(default=None, description="Why it was refused; None if not.")


class ListTemplates(Payload):
    """Query to policy: every template. Replied with :class:`TemplatesListed`."""

    message_type = "templates.list"


class TemplatesListed(Payload):
    """Reply to :class:`ListTemplates`."""

    message_type = "templates.listed"

    templates: list[TemplateView] = Field(description="Every template, by name.")


class DeleteTemplate(Payload):
    """Command to policy: delete a template and its NVRAM copy in the store. VMs made from
    it keep their own NVRAM. Replied with ``DeleteTemplateReply``; deleting an unknown template is
    refused, so a typo does not read as a deletion."""

    message_type = "template.delete"

    template_id: VmId = Field(description="The template.")


class CreateVmFromTemplate(Payload):
    """Command to policy: register a new VM from a template through the TPM approval rules
    (as ``tpm.enable``); the store gives it the template's NVRAM, and its TPM is made anew
    on its first start. Replied with ``CreateVmFromTemplateReply``: the approval as
    ``tpm.enable``'s reply has it, and whether the template's NVRAM was copied."""

    message_type = "vm.create-from-template"

    template_id: VmId = Field(description="The template.")
    vm_id: VmId = Field(description="The new VM's id; it must have no stored state.")
    name: VmName = Field(description="The new VM's libvirt domain name.")
    cluster: str = Field(
        default=DEFAULT_CLUSTER,
        pattern=CLUSTER_PATTERN,
        description="The cluster the VM will run in; all its live hosts must have swtpm.",
    )
    override: bool = Field(
        default=False, description="Approve although the cluster's hosts do not all report swtpm."
    )
    override_guest_os: bool = Field(
        default=False, description="Approve although the guest-OS rules do not allow a TPM."
    )
    allow_duplicate_name: bool = Field(
        default=False, description="Register it although another VM has the same name."
    )
