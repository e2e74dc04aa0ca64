"""Finding a domain's TPM and NVRAM state from its XML, and the XML policy builds."""

from __future__ import annotations

from pathlib import Path

import pytest

from keeper_host_agent.hypervisor.domain_xml import DomainXmlError, fill_nvram_path, parse_domain
from keeper_policy.placement.domain_definition import domain_xml
from keeper_shared.domain_metadata import PLACEMENT_NAMESPACE
from keeper_shared.messages.tpm import VmSpec

ROOT = Path("/var/lib/libvirt/swtpm")
NVRAM_DIR = Path("/var/lib/libvirt/qemu/nvram")
VM_ID = "6b2f7e0a-3c1d-4d6e-9a8b-1c2d3e4f5a6b"


def _parse(xml: str) -> object:
    return parse_domain(xml, swtpm_root=ROOT, nvram_dir=NVRAM_DIR)


def test_policy_xml_round_trips_through_discovery() -> None:
    spec = VmSpec(vm_id=VM_ID, name="win11", guest_os="windows-11")
    xml = domain_xml(
        spec,
        tpm_xml="<tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm>",
        epoch=7,
        ovmf_code=Path("/usr/share/OVMF/OVMF_CODE_4M.fd"),
        ovmf_vars_template=Path("/usr/share/OVMF/OVMF_VARS_4M.fd"),
    )
    location = parse_domain(fill_nvram_path(xml, NVRAM_DIR), swtpm_root=ROOT, nvram_dir=NVRAM_DIR)
    assert location is not None
    assert location.vm_id == VM_ID
    assert location.epoch == 7
    assert location.tpm_dir == ROOT / VM_ID / "tpm2"
    assert location.nvram_path == NVRAM_DIR / "win11_VARS.fd"
    assert (location.arch, location.machine) == ("x86_64", "q35")
    assert (location.tpm_model, location.tpm_version) == ("tpm-crb", "2.0")


def test_nvram_path_is_taken_as_written() -> None:
    xml = f"""<domain type='kvm'><name>a</name><uuid>{VM_ID.upper()}</uuid>
      <os><type arch='x86_64' machine='q35'>hvm</type>
      <nvram>/srv/vms/custom-name.bin</nvram></os></domain>"""
    location = _parse(xml)
    assert location is not None
    assert location.nvram_path == Path("/srv/vms/custom-name.bin")  # type: ignore[attr-defined]
    assert location.vm_id == VM_ID  # type: ignore[attr-defined]
    assert location.tpm_dir is None  # type: ignore[attr-defined]


def test_efi_firmware_attribute_implies_default_nvram() -> None:
    xml = f"""<domain type='kvm'><name>b</name><uuid>{VM_ID}</uuid>
      <os firmware='efi'><type arch='x86_64'>hvm</type></os></domain>"""
    location = _parse(xml)
    assert location is not None
    assert location.nvram_path == NVRAM_DIR / "b_VARS.fd"  # type: ignore[attr-defined]


def test_domain_without_tpm_or_uefi_is_ignored() -> None:
    xml = f"""<domain type='kvm'><name>c</name><uuid>{VM_ID}</uuid>
      <os><type arch='x86_64'>hvm</type></os>
      <devices><tpm model='tpm-tis'><backend type='passthrough'/></tpm></devices></domain>"""
    assert _parse(xml) is None


@pytest.mark.parametrize(
    "xml",
    ["<domain", "<domain type='kvm'><name>x</name></domain>", "<domain><uuid>u</uuid></domain>"],
)
def test_unusable_xml_is_a_clear_error(xml: str) -> None:
    with pytest.raises(DomainXmlError):
        _parse(xml)


def test_bad_epoch_metadata_reads_as_unplaced() -> None:
    xml = f"""<domain type='kvm'><name>d</name><uuid>{VM_ID}</uuid>
      <metadata><k:placement xmlns:k='{PLACEMENT_NAMESPACE}' epoch='x'/></metadata>
      <os firmware='efi'><type arch='x86_64'>hvm</type></os></domain>"""
    location = _parse(xml)
    assert location is not None
    assert location.epoch == 0  # type: ignore[attr-defined]


def test_filling_the_nvram_path_keeps_a_managers_domain_as_written() -> None:
    xml = (
        "<domain type='kvm'><name>web</name><uuid>" + VM_ID + "</uuid><metadata>"
        "<nova:instance xmlns:nova='http://openstack.org/xmlns/libvirt/nova/1.1'>"
        "<nova:name>web</nova:name></nova:instance></metadata>"
        "<os><type arch='x86_64' machine='q35'>hvm</type><loader type='pflash'>/c.fd</loader>"
        "<nvram template='/t.fd'/></os><devices><disk type='file' device='disk'>"
        "<source file='/images/web.qcow2'/><target dev='vda' bus='virtio'/></disk>"
        "</devices></domain>"
    )

    filled = fill_nvram_path(xml, NVRAM_DIR)

    assert "<nova:instance xmlns:nova=" in filled  # ElementTree would have made it ns0
    assert f'<nvram template="/t.fd">{NVRAM_DIR}/web_VARS.fd</nvram>' in filled
    assert '<source file="/images/web.qcow2"/>' in filled


def test_filling_the_nvram_path_refuses_a_doctype() -> None:
    with pytest.raises(DomainXmlError, match="DOCTYPE"):
        fill_nvram_path("<!DOCTYPE domain><domain><name>x</name></domain>", NVRAM_DIR)
