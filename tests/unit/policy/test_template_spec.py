"""What a template keeps of a VM's spec and what a VM made from it gets; a template request
names exactly one source. Pure rules, no I/O."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pytest
from pydantic import ValidationError

from keeper_policy.templates.spec import start_refusal, template_spec, vm_spec
from keeper_shared.messages.template import CreateTemplate, TemplateView
from keeper_shared.messages.tpm import VmSpec
from keeper_shared.messages.vm_hardware import DiskSpec, InterfaceSpec

TEMPLATE_ID = str(uuid.uuid4())


def golden() -> VmSpec:
    return VmSpec(
        vm_id=str(uuid.uuid4()),
        name="win-golden",
        guest_os="windows-11",
        secure_boot=True,
        encrypt_tpm_state=True,
        memory_mib=8192,
        vcpus=4,
        disks=[DiskSpec(source="/var/lib/libvirt/images/golden.qcow2")],
        interfaces=[InterfaceSpec(network="default", mac="52:54:00:12:34:56")],
    )


def test_a_template_keeps_the_machine_and_drops_what_is_one_vms() -> None:
    kept = template_spec(golden(), TEMPLATE_ID, "win11-base")

    assert (kept.vm_id, kept.name) == (TEMPLATE_ID, "win11-base")
    assert (kept.disks, kept.interfaces) == ([], [])
    assert kept.secure_boot
    assert kept.encrypt_tpm_state
    assert (kept.guest_os, kept.memory_mib, kept.vcpus) == ("windows-11", 8192, 4)


def test_a_vm_from_a_template_has_its_own_id_and_name() -> None:
    template = TemplateView(
        template_id=TEMPLATE_ID,
        name="win11-base",
        spec=template_spec(golden(), TEMPLATE_ID, "win11-base"),
        source_vm_id=None,
        nvram=False,
        created_at=datetime.now(UTC),
    )
    vm_id = str(uuid.uuid4())

    made = vm_spec(template, vm_id, "desk-01")

    assert (made.vm_id, made.name) == (vm_id, "desk-01")
    assert made.model_dump(exclude={"vm_id", "name"}) == template.spec.model_dump(
        exclude={"vm_id", "name"}
    )
    assert "win11-base" in start_refusal(template)
    assert "keeper vm create" in start_refusal(template)


@pytest.mark.parametrize("sources", [{}, {"from_vm_id": str(uuid.uuid4()), "spec": golden()}])
def test_a_template_is_made_from_exactly_one_source(sources: dict[str, object]) -> None:
    with pytest.raises(ValidationError, match="exactly one"):
        CreateTemplate.model_validate({"template_id": TEMPLATE_ID, "name": "t", **sources})
