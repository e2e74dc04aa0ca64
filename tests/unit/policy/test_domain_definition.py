"""The demo's domain template: each architecture boots the firmware its TPM works with."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

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
