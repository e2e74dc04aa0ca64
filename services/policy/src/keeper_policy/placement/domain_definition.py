"""The libvirt domain XML policy hands to a host: the VM spec, its TPM, its placement epoch."""

from __future__ import annotations

import uuid
import xml.etree.ElementTree as ET
from pathlib import Path
from xml.sax.saxutils import quoteattr

from keeper_shared.domain_metadata import PLACEMENT_NAMESPACE
from keeper_shared.messages.tpm import VmSpec


def domain_xml(
    spec: VmSpec, *, tpm_xml: str, epoch: int, ovmf_code: Path, ovmf_vars_template: Path
) -> str:
    """A UEFI domain with the approved TPM. The `<nvram>` names no path: the host agent
    knows where its NVRAM files live and fills it in. A Secure Boot VM gets a secure loader
    (the caller passes the Secure Boot firmware and its key-enrolled NVRAM template)."""
    secure = " secure='yes'" if spec.secure_boot else ""
    smm = "on" if spec.smm else "off"
    return f"""<domain type='qemu'>
  <name>{spec.name}</name>
  <uuid>{spec.vm_id}</uuid>
  <metadata>
    <keeper:placement xmlns:keeper={quoteattr(PLACEMENT_NAMESPACE)} epoch='{epoch}'/>
  </metadata>
  <memory unit='MiB'>{spec.memory_mib}</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch={quoteattr(spec.arch)} machine={quoteattr(spec.machine)}>hvm</type>
    <loader readonly='yes'{secure} type='pflash'>{ovmf_code}</loader>
    <nvram template={quoteattr(str(ovmf_vars_template))}/>
  </os>
  <features><acpi/><smm state='{smm}'/></features>
  <devices>
    {tpm_xml}
    <serial type='pty'/>
  </devices>
</domain>
"""


def with_tpm_encryption(tpm_xml: str, secret_uuid: str) -> str:
    """The approved `<tpm>` element with `<encryption secret='…'/>` in its emulator backend:
    libvirt then has swtpm encrypt the state with that secret's value."""
    canonical = str(uuid.UUID(secret_uuid))
    tpm = ET.fromstring(tpm_xml)  # noqa: S314 - policy's own element (see tpm.rules)
    backend = tpm.find("backend")
    if backend is None or backend.get("type") != "emulator":
        raise ValueError("only an emulated TPM (swtpm) can encrypt its state")
    for old in backend.findall("encryption"):
        backend.remove(old)
    ET.SubElement(backend, "encryption", {"secret": canonical})
    return ET.tostring(tpm, encoding="unicode")
