"""What a domain's XML says about the VM, for policy's approval rules when it adopts a domain
someone else defined: architecture, machine, firmware, TPM, Secure Boot, the guest OS as
libosinfo or the keeper's adoption marker names it. Pure: tested on literal XML.
"""

from __future__ import annotations

import uuid
import xml.etree.ElementTree as ET
from dataclasses import dataclass

from keeper_shared.domain_metadata import ADOPTION_NAMESPACE
from keeper_shared.messages.adoption import DomainSpecRead
from keeper_shared.messages.tpm import Firmware

LIBOSINFO_NAMESPACE = "http://libosinfo.org/xmlns/libvirt/domain/1.0"
"""Where virt-install, virt-manager and others record the guest OS in `<metadata>`."""

_MEMORY_UNITS_KIB = {
    "b": 1 / 1024,
    "bytes": 1 / 1024,
    "k": 1,
    "kib": 1,
    "kb": 1000 / 1024,
    "m": 1024,
    "mib": 1024,
    "mb": 1000**2 / 1024,
    "g": 1024**2,
    "gib": 1024**2,
    "gb": 1000**3 / 1024,
    "t": 1024**3,
    "tib": 1024**3,
    "tb": 1000**4 / 1024,
}
"""libvirt's `<memory unit>` values in KiB (its default unit)."""


@dataclass(frozen=True)
class DomainReading:
    """A domain's spec, and what its keeper marker says."""

    spec: DomainSpecRead
    marked: bool
    """The metadata carries `<keeper:adopt/>`."""
    guest_os: str | None
    """The marker's `guest-os`."""


def read_domain_spec(xml_text: str) -> DomainReading:
    """Read ``xml_text`` (libvirt's own serialisation of a domain). Values that do not parse
    are reported empty rather than refused: the approval rules then say what is missing."""
    root = ET.fromstring(xml_text)  # noqa: S314 - libvirt's own serialisation
    os_type = root.find("os/type")
    loader = root.find("os/loader")
    os_element = root.find("os")
    uefi = (
        root.find("os/nvram") is not None
        or (os_element is not None and os_element.get("firmware") == "efi")
        or (loader is not None and loader.get("type") == "pflash")
    )
    tpm = root.find("devices/tpm")
    backend = tpm.find("backend") if tpm is not None else None
    emulated = backend is not None and backend.get("type") == "emulator"
    smm = root.find("features/smm")
    marker = root.find(f"metadata/{{{ADOPTION_NAMESPACE}}}adopt")
    osinfo = root.find(f"metadata/{{{LIBOSINFO_NAMESPACE}}}libosinfo/{{{LIBOSINFO_NAMESPACE}}}os")
    spec = DomainSpecRead(
        arch=_bounded(os_type.get("arch", "") if os_type is not None else "", 32),
        machine=_bounded(os_type.get("machine", "") if os_type is not None else "", 64),
        firmware=Firmware.UEFI if uefi else Firmware.BIOS,
        memory_mib=_memory_mib(root.find("memory")),
        tpm_model=_bounded(tpm.get("model", ""), 32) or None if tpm is not None else None,
        tpm_version=_tpm_version(backend) if emulated else None,
        tpm_emulated=emulated,
        secure_boot=loader is not None and loader.get("secure") == "yes",
        smm=smm is not None and smm.get("state", "on") == "on",
        tpm_secret_uuid=_secret(backend) if emulated else None,
        osinfo_id=_bounded(osinfo.get("id", ""), 256) or None if osinfo is not None else None,
    )
    guest_os = _bounded(marker.get("guest-os", ""), 64) if marker is not None else None
    return DomainReading(spec=spec, marked=marker is not None, guest_os=guest_os or None)


def _bounded(text: str, limit: int) -> str:
    """``text`` when it fits the message's bound; empty (unknown) when it does not."""
    return text if len(text) <= limit else ""


def _tpm_version(backend: ET.Element | None) -> str | None:
    version = backend.get("version", "") if backend is not None else ""
    return _bounded(version, 8) or None


def _memory_mib(element: ET.Element | None) -> int:
    if element is None or not (element.text or "").strip():
        return 0
    factor = _MEMORY_UNITS_KIB.get(element.get("unit", "KiB").lower())
    try:
        amount = int((element.text or "").strip())
    except ValueError:
        return 0
    return 0 if factor is None else int(amount * factor // 1024)


def _secret(backend: ET.Element | None) -> str | None:
    encryption = backend.find("encryption") if backend is not None else None
    if encryption is None:
        return None
    try:
        return str(uuid.UUID(encryption.get("secret", "")))
    except ValueError:
        return None
