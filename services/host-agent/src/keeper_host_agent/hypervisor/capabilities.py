"""What this host can run, found out once at start-up for the heartbeat."""

from __future__ import annotations

import platform
from pathlib import Path

from keeper_shared.messages.host import HostCapabilities
from keeper_shared.swtpm import SwtpmError, swtpm_version

UEFI_FIRMWARE_PATHS = (
    Path("/usr/share/OVMF/OVMF_CODE_4M.fd"),
    Path("/usr/share/OVMF/OVMF_CODE.fd"),
    Path("/usr/share/AAVMF/AAVMF_CODE.fd"),
)

ALSO_RUNS = {"x86_64": ("i686",)}
"""Guest architectures a host runs besides its own: every x86_64 CPU runs 32-bit guests.
Policy places a VM only on a host that reports the VM's architecture."""


def guest_architectures(host_arch: str) -> list[str]:
    """The guest architectures a host of ``host_arch`` runs, its own first."""
    return [host_arch, *ALSO_RUNS.get(host_arch, ())]


async def probe_capabilities(libvirt_version: str, *, tpm_secrets: bool) -> HostCapabilities:
    """swtpm's version (None when absent), libvirt's, the host arch, UEFI firmware, and
    whether libvirt keeps secrets (``tpm_secrets``, asked of the hypervisor by the caller)."""
    try:
        swtpm: str | None = await swtpm_version()
    except (SwtpmError, FileNotFoundError):
        swtpm = None
    return HostCapabilities(
        swtpm_version=swtpm,
        libvirt_version=libvirt_version,
        architectures=guest_architectures(platform.machine()),
        uefi_firmware=any(path.exists() for path in UEFI_FIRMWARE_PATHS),
        tpm_secrets=tpm_secrets,
    )
