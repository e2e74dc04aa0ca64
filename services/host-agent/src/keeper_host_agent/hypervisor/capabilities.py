"""What this host can run, found out once at start-up for the heartbeat."""

from __future__ import annotations

import fcntl
import os
import platform
import xml.etree.ElementTree as ET
from pathlib import Path

from keeper_shared.libtpms import installed_libtpms_version
from keeper_shared.messages.host import HostCapabilities
from keeper_shared.swtpm import SwtpmError, swtpm_version

UEFI_FIRMWARE_PATHS = (
    Path("/usr/share/OVMF/OVMF_CODE_4M.fd"),
    Path("/usr/share/OVMF/OVMF_CODE.fd"),
    Path("/usr/share/AAVMF/AAVMF_CODE.fd"),
)

KVM_DEVICE = Path("/dev/kvm")

KVM_CHECK_EXTENSION = 0xAE03
"""The `KVM_CHECK_EXTENSION` ioctl on `/dev/kvm` (`_IO(KVMIO, 0x03)`): > 0 when supported."""

KVM_CAP_X86_SMM = 117
"""KVM emulates System Management Mode, which OVMF with Secure Boot needs."""

X86_HOSTS = ("x86_64", "i686")

ALSO_RUNS = {"x86_64": ("i686",)}
"""Guest architectures a host runs besides its own: every x86_64 CPU runs 32-bit guests.
Policy places a VM only on a host that reports the VM's architecture."""


def guest_architectures(host_arch: str) -> list[str]:
    """The guest architectures a host of ``host_arch`` runs, its own first."""
    return [host_arch, *ALSO_RUNS.get(host_arch, ())]


def runs_kvm(capabilities_xml: str, host_arch: str) -> bool:
    """Whether libvirt's capabilities (``virsh capabilities``) offer the `kvm` domain type
    for hvm guests of ``host_arch``. libvirt lists it only where `/dev/kvm` is usable by
    QEMU, so a host with the device but without access, or a ``test:///`` driver, says no.
    XML that does not parse says no too: the template then emulates, which always works."""
    try:
        root = ET.fromstring(capabilities_xml)  # noqa: S314 - libvirt's own document
    except ET.ParseError:
        return False
    return any(
        guest.findtext("os_type") == "hvm"
        and arch.get("name") == host_arch
        and any(domain.get("type") == "kvm" for domain in arch.findall("domain"))
        for guest in root.findall("guest")
        for arch in guest.findall("arch")
    )


def kvm_emulates_smm(device: Path = KVM_DEVICE) -> bool:
    """Whether this host's KVM emulates SMM. libvirt offers KVM on a host whose KVM has no
    SMM (some nested or paravirtual KVMs, such as kvm-pvm), and QEMU then refuses to start
    an x86 UEFI domain with `<smm state='on'/>`: "System Management Mode not supported by
    this hypervisor". No access to the device says no."""
    try:
        descriptor = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        return fcntl.ioctl(descriptor, KVM_CHECK_EXTENSION, KVM_CAP_X86_SMM) > 0
    except OSError:
        return False
    finally:
        os.close(descriptor)


async def probe_capabilities(
    libvirt_version: str, *, tpm_secrets: bool, capabilities_xml: str
) -> HostCapabilities:
    """swtpm's and libtpms' versions (None when absent), libvirt's, the host arch, UEFI firmware,
    whether libvirt keeps secrets (``tpm_secrets``) and runs KVM (from
    ``capabilities_xml``), both asked of the hypervisor by the caller; on x86, KVM counts
    only when it emulates SMM."""
    try:
        swtpm: str | None = await swtpm_version()
    except (SwtpmError, FileNotFoundError):
        swtpm = None
    host_arch = platform.machine()
    # The template boots x86 UEFI guests with SMM on: KVM without it cannot run them.
    kvm = runs_kvm(capabilities_xml, host_arch) and (
        host_arch not in X86_HOSTS or kvm_emulates_smm()
    )
    return HostCapabilities(
        swtpm_version=swtpm,
        libtpms_version=installed_libtpms_version(),
        libvirt_version=libvirt_version,
        architectures=guest_architectures(host_arch),
        uefi_firmware=any(path.exists() for path in UEFI_FIRMWARE_PATHS),
        tpm_secrets=tpm_secrets,
        kvm=kvm,
    )
