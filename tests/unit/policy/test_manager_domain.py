"""A VM manager's own domain XML handed to ``vm.place``: what agrees with the VM's approval
is completed (TPM, NVRAM) and otherwise kept as written; what conflicts is refused with
every reason; the start stamps its epoch beside the manager's metadata."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET

import pytest

from keeper_policy.placement.manager_domain import (
    DomainCheck,
    check_manager_domain,
    stamp_for_start,
)
from keeper_policy.tpm.rules import TPM_MODEL_BY_ARCH, tpm_element
from keeper_shared.domain_document import MAX_DOMAIN_XML_CHARS
from keeper_shared.domain_metadata import PLACEMENT_NAMESPACE
from keeper_shared.messages.tpm import Firmware, VmSpec

VM_ID = "6b2f7e0a-3c1d-4d6e-9a8b-1c2d3e4f5a6b"
OTHER_ID = "0f0e0d0c-0b0a-4098-8765-432101234567"
NAME = "web-01"
SECRET = "9a8b7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d"
OSINFO = "http://libosinfo.org/xmlns/libvirt/domain/1.0"
NOVA = "http://openstack.org/xmlns/libvirt/nova/1.1"

DISK = (
    "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
    "<source file='/var/lib/libvirt/images/web-01.qcow2'/><target dev='vda' bus='virtio'/>"
    "</disk>"
)
INTERFACE = (
    "<interface type='network'><mac address='52:54:00:12:34:56'/>"
    "<source network='default'/><model type='virtio'/></interface>"
)
METADATA = (
    f"<libosinfo:libosinfo xmlns:libosinfo='{OSINFO}'>"
    "<libosinfo:os id='http://microsoft.com/win/11'/></libosinfo:libosinfo>"
    f"<nova:instance xmlns:nova='{NOVA}'><nova:name>web</nova:name></nova:instance>"
)
TPM_CRB = "<tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm>"
UEFI_OS = (
    "<os><type arch='x86_64' machine='pc-q35-7.2'>hvm</type>"
    "<loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE_4M.fd</loader>"
    "<nvram template='/usr/share/OVMF/OVMF_VARS_4M.fd'/></os>"
)
SMM_ON = "<features><acpi/><smm state='on'/></features>"


def manager_xml(
    *,
    head: str = f"<name>{NAME}</name><uuid>{VM_ID}</uuid>",
    metadata: str = METADATA,
    os: str = UEFI_OS,
    features: str = SMM_ON,
    devices: str = DISK + INTERFACE,
    domain_type: str = "kvm",
) -> str:
    """A domain as virt-install or Nova writes one (no TPM unless ``devices`` has one)."""
    return (
        f"<domain type='{domain_type}'>{head}<metadata>{metadata}</metadata>"
        "<memory unit='KiB'>4194304</memory><vcpu placement='static'>4</vcpu>"
        f"{os}{features}<devices>{devices}</devices></domain>"
    )


def spec(**changes: object) -> VmSpec:
    values: dict[str, object] = {"vm_id": VM_ID, "name": NAME, "guest_os": "windows-11"}
    values.update(changes)
    return VmSpec.model_validate(values)


def check(xml: str, vm: VmSpec | None = None) -> DomainCheck:
    vm = vm or spec()
    return check_manager_domain(xml, vm, tpm_element(TPM_MODEL_BY_ARCH[vm.arch]))


def accepted(xml: str, vm: VmSpec | None = None) -> ET.Element:
    result = check(xml, vm)
    assert result.accepted, result.reasons
    assert result.xml is not None
    return ET.fromstring(result.xml)  # noqa: S314 - the code under test's own output


def refused(xml: str, vm: VmSpec | None = None) -> list[str]:
    result = check(xml, vm)
    assert not result.accepted
    assert result.xml is None
    return result.reasons


def canonical(element: ET.Element | None) -> str:
    assert element is not None
    return ET.canonicalize(ET.tostring(element, encoding="unicode"))


# --- accepted --------------------------------------------------------------------------


def test_the_managers_domain_is_kept_and_the_approved_tpm_is_added() -> None:
    original = ET.fromstring(manager_xml())  # noqa: S314 - the test's own literal

    domain = accepted(manager_xml())

    assert domain.get("type") == "kvm"
    assert domain.findtext("vcpu") == "4"
    assert domain.findtext("memory") == "4194304"
    for path in ("devices/disk", "devices/interface", "metadata", "features"):
        assert canonical(domain.find(path)) == canonical(original.find(path)), path
    tpm = domain.find("devices/tpm")
    assert tpm is not None
    assert canonical(tpm) == canonical(ET.fromstring(TPM_CRB))  # noqa: S314
    assert len(domain.findall("devices/tpm")) == 1


def test_the_managers_namespace_prefixes_survive() -> None:
    result = check(manager_xml())

    assert result.xml is not None
    assert f'xmlns:libosinfo="{OSINFO}"' in result.xml
    assert "<nova:name>web</nova:name>" in result.xml
    assert "ns0:" not in result.xml


def test_a_tpm_that_is_the_approved_one_is_kept_and_completed() -> None:
    # No model (libvirt would pick the old tpm-tis) and no version (its default varies).
    extra = "<tpm><backend type='emulator' persistent_state='yes'><active_pcr_banks><sha256/>"
    extra += "</active_pcr_banks></backend></tpm>"

    domain = accepted(manager_xml(devices=DISK + extra))

    (tpm,) = domain.findall("devices/tpm")
    backend = tpm.find("backend")
    assert backend is not None
    assert tpm.get("model") == "tpm-crb"
    assert backend.get("version") == "2.0"
    assert backend.get("persistent_state") == "yes"
    assert backend.find("active_pcr_banks/sha256") is not None


def test_a_domain_without_identity_gets_the_vms() -> None:
    domain = accepted(manager_xml(head=""))

    assert domain.findtext("name") == NAME
    assert domain.findtext("uuid") == VM_ID
    assert [child.tag for child in domain][:3] == ["name", "uuid", "metadata"]


def test_the_uuid_may_be_written_in_capitals() -> None:
    accepted(manager_xml(head=f"<name>{NAME}</name><uuid>{VM_ID.upper()}</uuid>"))


def test_an_nvram_path_named_for_the_vm_is_left_to_the_host() -> None:
    os = UEFI_OS.replace(
        "<nvram template='/usr/share/OVMF/OVMF_VARS_4M.fd'/>",
        f"<nvram template='/usr/share/OVMF/OVMF_VARS_4M.fd'>/srv/nvram/{NAME}_VARS.fd</nvram>",
    )

    domain = accepted(manager_xml(os=os))

    nvram = domain.find("os/nvram")
    assert nvram is not None
    assert not (nvram.text or "").strip()  # the host fills in its NVRAM directory
    assert nvram.get("template") == "/usr/share/OVMF/OVMF_VARS_4M.fd"


def test_firmware_autoselection_gets_an_nvram_for_the_host_to_fill_in() -> None:
    os = "<os firmware='efi'><type arch='x86_64' machine='q35'>hvm</type></os>"

    domain = accepted(manager_xml(os=os))

    assert domain.find("os/nvram") is not None


def test_an_old_keeper_epoch_is_dropped_and_the_managers_metadata_kept() -> None:
    stale = f"<keeper:placement xmlns:keeper='{PLACEMENT_NAMESPACE}' epoch='9'/>"

    domain = accepted(manager_xml(metadata=METADATA + stale))

    assert domain.find(f"metadata/{{{PLACEMENT_NAMESPACE}}}placement") is None
    assert domain.find(f"metadata/{{{OSINFO}}}libosinfo") is not None
    assert domain.find(f"metadata/{{{NOVA}}}instance") is not None


def test_a_secure_boot_vm_on_q35_with_smm_is_accepted() -> None:
    os = UEFI_OS.replace("type='pflash'", "secure='yes' type='pflash'")

    accepted(manager_xml(os=os), spec(secure_boot=True))


@pytest.mark.parametrize("arch", ["ppc64le", "ppc64"])
def test_a_pseries_domain_boots_slof_and_gets_tpm_spapr_without_nvram(arch: str) -> None:
    vm = spec(arch=arch, machine="pseries", firmware=Firmware.SLOF, smm=False)
    os = f"<os><type arch='{arch}' machine='pseries-8.2'>hvm</type></os>"

    domain = accepted(manager_xml(os=os, features=""), vm)

    tpm = domain.find("devices/tpm")
    assert tpm is not None
    assert tpm.get("model") == "tpm-spapr"
    assert domain.find("os/nvram") is None  # SLOF keeps no NVRAM file
    assert domain.find("os/loader") is None


# --- refused ---------------------------------------------------------------------------


def test_every_reason_is_listed_at_once() -> None:
    xml = manager_xml(
        head=f"<name>other</name><uuid>{OTHER_ID}</uuid>",
        devices=DISK + "<tpm model='tpm-tis'><backend type='emulator' version='1.2'/></tpm>",
    )

    reasons = refused(xml)

    assert [reason.split(":")[0] for reason in reasons] == [
        "identity",
        "identity",
        "tpm",
        "tpm-version",
    ]
    assert "'other'" in reasons[0]
    assert OTHER_ID in reasons[1]
    assert "tpm-tis" in reasons[2]


@pytest.mark.parametrize(
    ("devices", "rule", "text"),
    [
        (
            "<tpm model='tpm-tis'><backend type='emulator' version='2.0'/></tpm>",
            "tpm",
            "the approved one tpm-crb",
        ),
        (
            "<tpm model='tpm-crb'><backend type='passthrough'><device path='/dev/tpm0'/>"
            "</backend></tpm>",
            "tpm",
            "'passthrough'",
        ),
        (
            "<tpm model='tpm-crb'><backend type='emulator' version='1.2'/></tpm>",
            "tpm-version",
            "'1.2'",
        ),
        (
            f"<tpm model='tpm-crb'><backend type='emulator' version='2.0'>"
            f"<encryption secret='{SECRET}'/></backend></tpm>",
            "tpm",
            "--encrypt-state",
        ),
        (TPM_CRB + TPM_CRB, "tpm", "2 TPM devices"),
    ],
    ids=["model", "passthrough", "version", "own-secret", "two"],
)
def test_a_tpm_that_is_not_the_approved_one_is_refused(devices: str, rule: str, text: str) -> None:
    (reason,) = refused(manager_xml(devices=DISK + devices))

    assert reason.startswith(f"{rule}: ")
    assert text in reason


def test_another_architecture_than_approved_is_refused() -> None:
    os = "<os><type arch='aarch64' machine='virt'>hvm</type><loader type='pflash'>x</loader></os>"

    reasons = refused(manager_xml(os=os, features=""))

    assert reasons == ["architecture: the domain's is 'aarch64', the VM was approved for x86_64"]


def test_a_domain_that_names_no_architecture_or_machine_is_refused() -> None:
    reasons = refused(manager_xml(os="<os><type>hvm</type></os>"))

    assert [reason.split(":")[0] for reason in reasons] == ["architecture", "machine"]


def test_a_bios_domain_is_refused_by_the_firmware_rule() -> None:
    os = "<os><type arch='x86_64' machine='pc-i440fx-7.2'>hvm</type></os>"

    (reason,) = refused(manager_xml(os=os))

    assert reason.startswith("firmware: TPM emulation needs UEFI firmware")


def test_secure_boot_without_smm_is_refused() -> None:
    os = UEFI_OS.replace("type='pflash'", "secure='yes' type='pflash'")

    (reason,) = refused(
        manager_xml(os=os, features="<features><acpi/></features>"), spec(secure_boot=True)
    )

    assert reason == "secure-boot: Secure Boot needs SMM turned on"


def test_secure_boot_on_an_i440fx_machine_is_refused() -> None:
    os = UEFI_OS.replace("type='pflash'", "secure='yes' type='pflash'").replace(
        "pc-q35-7.2", "pc-i440fx-7.2"
    )

    (reason,) = refused(manager_xml(os=os), spec(secure_boot=True))

    assert reason == "secure-boot: Secure Boot needs a q35 machine, not pc-i440fx-7.2"


@pytest.mark.parametrize("approved_secure", [True, False])
def test_secure_boot_other_than_approved_is_refused(approved_secure: bool) -> None:
    secure_os = UEFI_OS.replace("type='pflash'", "secure='yes' type='pflash'")
    os = UEFI_OS if approved_secure else secure_os

    (reason,) = refused(manager_xml(os=os), spec(secure_boot=approved_secure))

    assert reason.startswith("secure-boot: the VM was approved")


def test_secure_boot_asked_through_firmware_autoselection_counts() -> None:
    os = (
        "<os firmware='efi'><type arch='x86_64' machine='q35'>hvm</type><firmware>"
        "<feature enabled='yes' name='secure-boot'/></firmware></os>"
    )

    (reason,) = refused(manager_xml(os=os))

    assert reason == (
        "secure-boot: the VM was approved without Secure Boot, the domain has a Secure Boot loader"
    )


def test_a_pseries_domain_on_another_machine_is_refused() -> None:
    vm = spec(arch="ppc64le", machine="pseries", firmware=Firmware.SLOF, smm=False)
    os = "<os><type arch='ppc64le' machine='powernv9'>hvm</type></os>"

    (reason,) = refused(manager_xml(os=os, features=""), vm)

    assert reason == "machine: tpm-spapr needs a pseries machine, not powernv9"


@pytest.mark.parametrize(
    ("nvram", "text"),
    [
        ("<nvram>/var/lib/libvirt/qemu/nvram/other_VARS.fd</nvram>", "'/var/lib/libvirt/qemu"),
        ("<nvram type='network'><source protocol='iscsi' name='x'/></nvram>", "'network'"),
        ("<nvram/><nvram/>", "2 <nvram> elements"),
    ],
    ids=["another-file", "network", "two"],
)
def test_an_nvram_the_keeper_cannot_restore_is_refused(nvram: str, text: str) -> None:
    os = UEFI_OS.replace("<nvram template='/usr/share/OVMF/OVMF_VARS_4M.fd'/>", nvram)

    (reason,) = refused(manager_xml(os=os))

    assert reason.startswith("nvram: ")
    assert text in reason


@pytest.mark.parametrize(
    ("xml", "text"),
    [
        ("this is not XML", "not well-formed"),
        (
            "<!DOCTYPE domain [<!ENTITY x 'y'>]><domain type='kvm'>&x;</domain>",
            "DOCTYPE",
        ),
        ("<node><domain type='kvm'/></node>", "root element is <node>"),
        ("<domain type='kvm'>" + "x" * MAX_DOMAIN_XML_CHARS + "</domain>", "more than"),
    ],
    ids=["not-xml", "doctype", "not-a-domain", "huge"],
)
def test_dangerous_or_unusable_input_is_refused_clearly(xml: str, text: str) -> None:
    (reason,) = refused(xml)

    assert reason.startswith("domain-xml: ")
    assert text in reason


@pytest.mark.parametrize("domain_type", ["", "xen", "lxc"])
def test_a_domain_that_is_not_qemus_is_refused(domain_type: str) -> None:
    (reason,) = refused(manager_xml(domain_type=domain_type))

    assert reason == (
        f"domain-xml: <domain type={domain_type!r}>: the TPM emulator (swtpm) runs with QEMU "
        "domains, type 'kvm' or 'qemu'"
    )


# --- the start's stamp -----------------------------------------------------------------


def test_the_start_stamps_its_epoch_beside_the_managers_metadata() -> None:
    checked = check(manager_xml()).xml
    assert checked is not None

    stamped = ET.fromstring(stamp_for_start(checked, epoch=5, tpm_secret_uuid=None))  # noqa: S314
    again = ET.fromstring(stamp_for_start(checked, epoch=6, tpm_secret_uuid=None))  # noqa: S314

    placement = stamped.find(f"metadata/{{{PLACEMENT_NAMESPACE}}}placement")
    assert placement is not None
    assert placement.get("epoch") == "5"
    assert stamped.find(f"metadata/{{{NOVA}}}instance") is not None
    assert [p.get("epoch") for p in again.iter(f"{{{PLACEMENT_NAMESPACE}}}placement")] == ["6"]


def test_a_domain_without_metadata_gets_it_after_its_identity() -> None:
    xml = manager_xml().replace(f"<metadata>{METADATA}</metadata>", "")
    checked = check(xml).xml
    assert checked is not None

    stamped = ET.fromstring(stamp_for_start(checked, epoch=2, tpm_secret_uuid=None))  # noqa: S314

    assert [child.tag for child in stamped][:3] == ["name", "uuid", "metadata"]


def test_a_tpm_the_keeper_encrypts_names_the_stores_secret() -> None:
    checked = check(manager_xml(devices=DISK + TPM_CRB)).xml
    assert checked is not None

    stamped = stamp_for_start(checked, epoch=3, tpm_secret_uuid=SECRET.upper())

    assert re.findall(r"<encryption secret=\"([^\"]+)\"/>", stamped) == [SECRET]
