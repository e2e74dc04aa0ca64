"""Reading what the approval rules need from a domain someone else defined (pure XML)."""

from __future__ import annotations

from keeper_host_agent.hypervisor.domain_spec import read_domain_spec
from keeper_shared.messages.tpm import Firmware

VIRT_INSTALL = """<domain type='kvm'>
  <name>win11-desktop</name>
  <uuid>4b2c7d5e-1f3a-4c6b-9d8e-7f6a5b4c3d2e</uuid>
  <metadata>
    <libosinfo:libosinfo xmlns:libosinfo="http://libosinfo.org/xmlns/libvirt/domain/1.0">
      <libosinfo:os id="http://microsoft.com/win/11"/>
    </libosinfo:libosinfo>
  </metadata>
  <memory unit='KiB'>4194304</memory>
  <os firmware='efi'>
    <type arch='x86_64' machine='pc-q35-8.2'>hvm</type>
    <loader readonly='yes' secure='yes' type='pflash'>/usr/share/OVMF/CODE.secboot.fd</loader>
    <nvram template='/usr/share/OVMF/VARS.ms.fd'>/var/lib/libvirt/qemu/nvram/w_VARS.fd</nvram>
  </os>
  <features><acpi/><smm state='on'/></features>
  <devices>
    <tpm model='tpm-crb'>
      <backend type='emulator' version='2.0'>
        <encryption secret='6dd3e4a5-1d76-44ce-961f-f119f5aad935'/>
      </backend>
    </tpm>
  </devices>
</domain>"""


def test_a_virt_install_domain_is_read_whole() -> None:
    reading = read_domain_spec(VIRT_INSTALL)
    spec = reading.spec
    assert (spec.arch, spec.machine, spec.firmware) == ("x86_64", "pc-q35-8.2", Firmware.UEFI)
    assert spec.memory_mib == 4096
    assert (spec.tpm_model, spec.tpm_version, spec.tpm_emulated) == ("tpm-crb", "2.0", True)
    assert spec.secure_boot
    assert spec.smm
    assert spec.tpm_secret_uuid == "6dd3e4a5-1d76-44ce-961f-f119f5aad935"
    assert spec.osinfo_id == "http://microsoft.com/win/11"
    assert not reading.marked
    assert reading.guest_os is None


def test_the_keeper_marker_is_found_with_its_guest_os() -> None:
    marked = VIRT_INSTALL.replace(
        "<metadata>",
        "<metadata><keeper:adopt xmlns:keeper='https://vtpm-keeper.dev/xmlns/adopt/1' "
        "guest-os='windows-server-2022'/>",
    )
    reading = read_domain_spec(marked)
    assert reading.marked
    assert reading.guest_os == "windows-server-2022"


def test_a_bios_domain_with_a_passthrough_tpm_reads_as_such() -> None:
    xml = """<domain type='kvm'><name>old</name><uuid>4b2c7d5e-1f3a-4c6b-9d8e-7f6a5b4c3d2f</uuid>
      <memory>1048576</memory>
      <os><type arch='x86_64' machine='pc-i440fx-8.2'>hvm</type></os>
      <devices><tpm model='tpm-tis'><backend type='passthrough'/></tpm></devices>
    </domain>"""
    spec = read_domain_spec(xml).spec
    assert spec.firmware is Firmware.BIOS
    assert spec.memory_mib == 1024
    assert (spec.tpm_model, spec.tpm_emulated, spec.tpm_version) == ("tpm-tis", False, None)
    assert not spec.secure_boot
    assert not spec.smm
    assert spec.osinfo_id is None


def test_values_beyond_the_messages_bounds_read_as_unknown() -> None:
    xml = VIRT_INSTALL.replace("pc-q35-8.2", "m" * 100).replace(
        "<encryption secret='6dd3e4a5-1d76-44ce-961f-f119f5aad935'/>",
        "<encryption secret='not-a-uuid'/>",
    )
    spec = read_domain_spec(xml).spec
    assert spec.machine == ""
    assert spec.tpm_secret_uuid is None
