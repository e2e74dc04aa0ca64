"""Policy's own domain template, for VMs whose manager hands over no domain XML (the demo,
the tests): the VM spec, its TPM, its placement epoch."""

from __future__ import annotations

import string
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path
from xml.sax.saxutils import quoteattr

from keeper_policy.tpm.rules import X86, is_pseries
from keeper_shared.domain_metadata import PLACEMENT_NAMESPACE
from keeper_shared.messages.tpm import Firmware, VmSpec
from keeper_shared.messages.vm_hardware import DiskSpec, InterfaceSpec


def domain_xml(
    spec: VmSpec,
    *,
    tpm_xml: str,
    epoch: int,
    ovmf_code: Path,
    ovmf_vars_template: Path,
    kvm: bool = False,
) -> str:
    """A domain with the approved TPM, booting the firmware that TPM works with, with the
    spec's vCPUs, disks and interfaces. The demo's and the tests' domain: a VM manager hands
    its own XML to ``vm.place`` instead (see manager_domain).

    ``kvm``: the host runs KVM (its heartbeat says so), so the domain asks for it; without
    it QEMU emulates the CPU (TCG), as on a host without ``/dev/kvm`` or a simulated one.

    UEFI (x86_64, aarch64): a pflash loader and an `<nvram>` that names no path: the host
    agent knows where its NVRAM files live and fills it in. A Secure Boot VM gets a secure
    loader (the caller passes the Secure Boot firmware and its key-enrolled NVRAM template).
    SLOF (ppc64 pseries): QEMU's own firmware, so no loader and no NVRAM file; the TPM is
    `tpm-spapr`. SMM exists on x86 only and ACPI not on pseries, so the features follow the
    architecture.
    """
    loader = ""
    if spec.firmware is Firmware.UEFI:
        secure = " secure='yes'" if spec.secure_boot else ""
        loader = f"""
    <loader readonly='yes'{secure} type='pflash'>{ovmf_code}</loader>
    <nvram template={quoteattr(str(ovmf_vars_template))}/>"""
    features = ""
    if spec.arch in X86:
        features = f"\n  <features><acpi/><smm state='{'on' if spec.smm else 'off'}'/></features>"
    elif not is_pseries(spec.machine):
        features = "\n  <features><acpi/></features>"
    return f"""<domain type='{"kvm" if kvm else "qemu"}'>
  <name>{spec.name}</name>
  <uuid>{spec.vm_id}</uuid>
  <metadata>
    <keeper:placement xmlns:keeper={quoteattr(PLACEMENT_NAMESPACE)} epoch='{epoch}'/>
  </metadata>
  <memory unit='MiB'>{spec.memory_mib}</memory>
  <vcpu>{spec.vcpus}</vcpu>
  <os>
    <type arch={quoteattr(spec.arch)} machine={quoteattr(spec.machine)}>hvm</type>{loader}
  </os>{features}
  <devices>{_disks(spec.disks)}{_interfaces(spec.interfaces)}
    {tpm_xml}
    <serial type='pty'/>
  </devices>
</domain>
"""


def _disks(disks: list[DiskSpec]) -> str:
    """One `<disk>` per spec disk, named in order on its bus (`vda`, `vdb`; `sda`...)."""
    elements = []
    next_index = {"vd": 0, "sd": 0}
    for disk in disks:
        prefix = "vd" if disk.bus == "virtio" else "sd"
        target = f"{prefix}{string.ascii_lowercase[next_index[prefix]]}"
        next_index[prefix] += 1
        device = "cdrom" if disk.cdrom else "disk"
        readonly = "<readonly/>" if disk.cdrom else ""
        elements.append(
            f"""
    <disk type='file' device='{device}'>
      <driver name='qemu' type='{disk.image_format}'/>
      <source file={quoteattr(disk.source)}/>
      <target dev='{target}' bus='{disk.bus}'/>{readonly}
    </disk>"""
        )
    return "".join(elements)


def _interfaces(interfaces: list[InterfaceSpec]) -> str:
    """One `<interface>` per spec interface, on its libvirt network or host bridge."""
    elements = []
    for nic in interfaces:
        if nic.network is not None:
            kind, source = "network", f"<source network={quoteattr(nic.network)}/>"
        else:
            kind, source = "bridge", f"<source bridge={quoteattr(nic.bridge or '')}/>"
        mac = f"<mac address='{nic.mac}'/>" if nic.mac else ""
        elements.append(
            f"""
    <interface type='{kind}'>{mac}{source}<model type='{nic.model}'/></interface>"""
        )
    return "".join(elements)


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
