"""The demo's domain template: each architecture boots the firmware its TPM works with; KVM
where the host runs it; vCPUs, disks and interfaces from the spec."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from pydantic import ValidationError

from keeper_policy.placement.domain_definition import domain_xml
from keeper_policy.tpm.rules import TPM_MODEL_BY_ARCH, tpm_element
from keeper_shared.messages.tpm import Firmware, VmSpec

VM_ID = "6b2f7e0a-3c1d-4d6e-9a8b-1c2d3e4f5a6b"
CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")


def define(**changes: object) -> ET.Element:
    values: dict[str, object] = {"vm_id": VM_ID, "name": "vm", "guest_os": "rhel-9"}
    values.update(changes)
    spec = VmSpec.model_validate(values)
    xml = domain_xml(
        spec,
        tpm_xml=tpm_element(TPM_MODEL_BY_ARCH[spec.arch]),
        epoch=4,
        ovmf_code=CODE,
        ovmf_vars_template=VARS,
    )
    return ET.fromstring(xml)  # noqa: S314 - the template under test


@pytest.mark.parametrize("arch", ["ppc64le", "ppc64"])
def test_a_pseries_vm_boots_slof_with_tpm_spapr_and_no_uefi(arch: str) -> None:
    domain = define(arch=arch, machine="pseries", firmware=Firmware.SLOF)

    os_type = domain.find("os/type")
    assert os_type is not None
    assert (os_type.get("arch"), os_type.get("machine")) == (arch, "pseries")
    assert domain.find("os/loader") is None  # QEMU's SLOF, no OVMF
    assert domain.find("os/nvram") is None
    assert domain.find("features") is None  # neither SMM nor ACPI exist on pseries
    tpm = domain.find("devices/tpm")
    assert tpm is not None
    assert tpm.get("model") == "tpm-spapr"
    backend = tpm.find("backend")
    assert backend is not None
    assert (backend.get("type"), backend.get("version")) == ("emulator", "2.0")


def test_an_x86_vm_boots_ovmf_with_smm_and_tpm_crb() -> None:
    domain = define(secure_boot=True)

    loader = domain.find("os/loader")
    assert loader is not None
    assert loader.text == str(CODE)
    assert loader.get("secure") == "yes"
    nvram = domain.find("os/nvram")
    assert nvram is not None
    assert nvram.get("template") == str(VARS)
    assert domain.find("features/smm") is not None
    assert domain.find("features/acpi") is not None
    tpm = domain.find("devices/tpm")
    assert tpm is not None
    assert tpm.get("model") == "tpm-crb"


def test_an_aarch64_vm_boots_uefi_without_smm() -> None:
    domain = define(arch="aarch64", machine="virt")

    assert domain.find("os/loader") is not None
    assert domain.find("os/nvram") is not None
    assert domain.find("features/acpi") is not None
    assert domain.find("features/smm") is None  # x86 only
    tpm = domain.find("devices/tpm")
    assert tpm is not None
    assert tpm.get("model") == "tpm-tis"


def test_by_default_the_template_emulates_one_vcpu_without_disk_or_network() -> None:
    domain = define()

    assert domain.get("type") == "qemu"
    assert domain.findtext("vcpu") == "1"
    assert domain.find("devices/disk") is None
    assert domain.find("devices/interface") is None


def test_a_host_that_runs_kvm_gets_a_kvm_domain() -> None:
    spec = VmSpec(vm_id=VM_ID, name="vm", guest_os="rhel-9")
    xml = domain_xml(
        spec,
        tpm_xml=tpm_element("tpm-crb"),
        epoch=1,
        ovmf_code=CODE,
        ovmf_vars_template=VARS,
        kvm=True,
    )

    assert ET.fromstring(xml).get("type") == "kvm"  # noqa: S314 - the template under test


def test_vcpus_disks_and_interfaces_come_from_the_spec() -> None:
    domain = define(
        vcpus=4,
        disks=[
            {"source": "/var/lib/libvirt/images/vm.qcow2"},
            {"source": "/var/lib/libvirt/images/data.raw", "format": "raw"},
            {"source": "/srv/iso/win11.iso", "bus": "sata", "cdrom": True},
        ],
        interfaces=[
            {"network": "default", "mac": "52:54:00:00:00:01"},
            {"bridge": "br0", "model": "e1000e"},
        ],
    )

    assert domain.findtext("vcpu") == "4"
    disks = [
        (
            disk.get("device"),
            attribute(disk, "source", "file"),
            attribute(disk, "target", "dev"),
            attribute(disk, "driver", "type"),
            disk.find("readonly") is not None,
        )
        for disk in domain.findall("devices/disk")
    ]
    assert disks == [
        ("disk", "/var/lib/libvirt/images/vm.qcow2", "vda", "qcow2", False),
        ("disk", "/var/lib/libvirt/images/data.raw", "vdb", "raw", False),
        ("cdrom", "/srv/iso/win11.iso", "sda", "raw", True),
    ]
    nics = [
        (
            nic.get("type"),
            attribute(nic, "source", "network") or attribute(nic, "source", "bridge"),
            attribute(nic, "model", "type"),
            attribute(nic, "mac", "address"),
        )
        for nic in domain.findall("devices/interface")
    ]
    assert nics == [
        ("network", "default", "virtio", "52:54:00:00:00:01"),
        ("bridge", "br0", "e1000e", None),
    ]


def attribute(element: ET.Element, path: str, name: str) -> str | None:
    found = element.find(path)
    return None if found is None else found.get(name)


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        ({"disks": [{"source": "images/vm.qcow2"}]}, "absolute"),
        ({"disks": [{"source": "/srv/../etc/shadow"}]}, "absolute"),
        ({"disks": [{"source": "/srv/a\nb"}]}, "control characters"),
        ({"disks": [{"source": "/srv/win.iso", "cdrom": True}]}, "sata or scsi"),
        ({"disks": [{"source": "/srv/a.qcow2"}, {"source": "/srv/a.qcow2"}]}, "share an image"),
        ({"interfaces": [{"network": "default", "bridge": "br0"}]}, "exactly one"),
        ({"interfaces": [{}]}, "exactly one"),
        ({"interfaces": [{"bridge": "br0'/><x"}]}, "pattern"),
        ({"interfaces": [{"network": "a", "mac": "52:54:00:00:00:0G"}]}, "pattern"),
        (
            {
                "interfaces": [
                    {"network": "a", "mac": "52:54:00:00:00:01"},
                    {"bridge": "br0", "mac": "52:54:00:00:00:01"},
                ]
            },
            "share a MAC",
        ),
        ({"vcpus": 0}, "greater than or equal to 1"),
    ],
)
def test_a_spec_whose_hardware_the_template_cannot_build_is_refused(
    changes: dict[str, object], problem: str
) -> None:
    values: dict[str, object] = {"vm_id": VM_ID, "name": "vm", "guest_os": "rhel-9", **changes}
    with pytest.raises(ValidationError, match=problem):
        VmSpec.model_validate(values)
