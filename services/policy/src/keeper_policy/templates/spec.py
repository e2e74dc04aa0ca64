"""What a template keeps of a spec, and what a VM made from it gets. Pure: no I/O."""

from __future__ import annotations

from keeper_shared.messages.template import TemplateView
from keeper_shared.messages.tpm import VmSpec


def template_spec(spec: VmSpec, template_id: str, name: str) -> VmSpec:
    """``spec`` as a template keeps it: under the template's id and name, without disks
    (an image file belongs to one VM: two VMs writing one image corrupt it) and without
    interfaces (a MAC address must name one guest). The rest, firmware, Secure Boot, TPM,
    machine, memory, vCPUs and guest OS, is what every VM made from it shares."""
    return spec.model_copy(
        update={"vm_id": template_id, "name": name, "disks": [], "interfaces": []}
    )


def vm_spec(template: TemplateView, vm_id: str, name: str) -> VmSpec:
    """The spec of a new VM made from ``template``: the template's, under its own id and
    name."""
    return template.spec.model_copy(update={"vm_id": vm_id, "name": name})


def start_refusal(template: TemplateView) -> str:
    """Why ``template`` cannot be placed or started."""
    return (
        f"{template.template_id} is the template {template.name!r}, which cannot be started: "
        f"create a VM from it (`keeper vm create NAME --template {template.name}`)"
    )
