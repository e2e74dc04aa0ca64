"""What the agent needs from a libvirt domain XML: where its TPM and NVRAM state live.

Parsing is pure (no libvirt, no files) so it is tested on literal XML. Only domains with an
emulated TPM 2.0 or a UEFI NVRAM matter; anything else is ignored cheaply.
"""

from __future__ import annotations

import uuid
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from keeper_shared.domain_document import (
    MAX_START_XML_CHARS,
    DomainDocumentError,
    children,
    read_domain_element,
    set_text,
    text_of,
)
from keeper_shared.domain_metadata import PLACEMENT_NAMESPACE


class DomainXmlError(ValueError):
    """The domain XML cannot be used (malformed, or missing what the command needs)."""


@dataclass(frozen=True)
class DomainStateLocation:
    """One domain as the agent tracks it."""

    vm_id: str
    name: str
    epoch: int
    tpm_dir: Path | None
    """swtpm's `tpm2` directory, None when the domain has no emulated TPM."""
    nvram_path: Path | None
    """The NVRAM file, None when the domain has no UEFI NVRAM."""
    arch: str
    machine: str
    tpm_model: str | None
    tpm_version: str | None
    tpm_secret_uuid: str | None = None
    """The libvirt secret swtpm encrypts the TPM state with (`<encryption secret>`)."""


def parse_domain(xml_text: str, *, swtpm_root: Path, nvram_dir: Path) -> DomainStateLocation | None:
    """Locate the domain's TPM and NVRAM state, or None when it has neither."""
    try:
        root = ET.fromstring(xml_text)  # noqa: S314 - trusted source, no entity expansion
    except ET.ParseError as error:
        raise DomainXmlError(f"domain XML does not parse: {error}") from None
    uuid_text = root.findtext("uuid")
    name = root.findtext("name")
    if not uuid_text or not name:
        raise DomainXmlError("domain XML lacks <uuid> or <name>")
    vm_id = uuid_text.strip().lower()

    tpm = root.find("devices/tpm")
    backend = tpm.find("backend") if tpm is not None else None
    emulated = backend is not None and backend.get("type") == "emulator"
    tpm_dir = swtpm_root / vm_id / "tpm2" if emulated else None

    nvram_path: Path | None = None
    nvram = root.find("os/nvram")
    loader = root.find("os/loader")
    os_element = root.find("os")
    is_uefi = os_element is not None and os_element.get("firmware") == "efi"
    if nvram is not None and (nvram.text or "").strip():
        nvram_path = Path((nvram.text or "").strip())
    elif nvram is not None or is_uefi or (loader is not None and loader.get("type") == "pflash"):
        nvram_path = nvram_dir / f"{name}_VARS.fd"
    if tpm_dir is None and nvram_path is None:
        return None

    os_type = root.find("os/type")
    return DomainStateLocation(
        vm_id=vm_id,
        name=name,
        epoch=_placement_epoch(root),
        tpm_dir=tpm_dir,
        nvram_path=nvram_path,
        arch=os_type.get("arch", "") if os_type is not None else "",
        machine=os_type.get("machine", "") if os_type is not None else "",
        tpm_model=tpm.get("model") if tpm is not None else None,
        tpm_version=backend.get("version") if backend is not None else None,
        tpm_secret_uuid=_encryption_secret(backend) if emulated else None,
    )


def _encryption_secret(backend: ET.Element | None) -> str | None:
    encryption = backend.find("encryption") if backend is not None else None
    if encryption is None:
        return None
    try:
        return str(uuid.UUID(encryption.get("secret", "")))
    except ValueError:
        raise DomainXmlError("the TPM's <encryption secret> is not a UUID") from None


def _placement_epoch(root: ET.Element) -> int:
    element = root.find(f"metadata/{{{PLACEMENT_NAMESPACE}}}placement")
    if element is None:
        return 0
    try:
        return max(0, int(element.get("epoch", "0")))
    except ValueError:
        return 0


def fill_nvram_path(xml_text: str, nvram_dir: Path) -> str:
    """Give `<nvram>` an explicit path under this host's NVRAM dir when it names none.

    The XML comes from policy, which does not know host paths; the agent does, and the
    prepare step already wrote the file there. It may be a VM manager's own domain, so
    everything else stays as written (namespace prefixes of its metadata included).
    """
    try:
        root = read_domain_element(xml_text, max_chars=MAX_START_XML_CHARS)
    except DomainDocumentError as error:
        raise DomainXmlError(str(error)) from None
    names = children(root, "name")
    name = text_of(names[0]) if names else ""
    for os_element in children(root, "os"):
        for nvram in children(os_element, "nvram"):
            if name and not text_of(nvram) and not nvram.getAttribute("type"):
                set_text(nvram, str(nvram_dir / f"{name}_VARS.fd"))
    return root.toxml()
