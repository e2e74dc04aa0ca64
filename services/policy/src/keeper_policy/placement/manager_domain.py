"""The domain XML a VM manager hands over with ``vm.place``: checked against the VM's
approval, completed with what the keeper needs, and everything else kept as written. Pure.

The manager (virt-install, Nova, oVirt, automation) owns the domain: its disks, interfaces,
vCPUs, devices and metadata are its business, and the keeper defines exactly what it wrote.
The keeper's business is the TPM and the NVRAM it restores, and the approval behind them:

- identity: the UUID and name are the registered VM's (the NVRAM file the store restores
  is named after it); a domain that names none gets the VM's;
- the approval rules hold for what the XML says: its architecture is the approved one (the
  TPM model follows from it), the firmware is the one that architecture's TPM needs, the
  machine is one that TPM works on, Secure Boot is as approved and has q35 and SMM;
- the TPM is the approved one: an emulated TPM of the approved model and version is kept
  (an attribute it leaves out is filled in), anything else is refused; a domain without a
  TPM gets the approved element; a TPM encrypted with the manager's own secret is refused
  (the keeper creates and keeps the secret of a VM approved with ``--encrypt-state``);
- a UEFI domain's `<nvram>` names no path, or one ending in `<name>_VARS.fd`: it is
  emptied, so the host fills in its NVRAM directory, where the store restored the file;
- an old keeper placement epoch in `<metadata>` is dropped; the start stamps the new one
  beside the manager's own metadata (``stamp_for_start``).

Every reason is reported, so the manager fixes them in one go.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import PurePosixPath
from xml.dom import minidom

from keeper_policy.tpm.rules import PPC64, hard_rule_failures
from keeper_shared.domain_document import (
    MAX_DOMAIN_XML_CHARS,
    DomainDocumentError,
    children,
    document_of,
    element_children,
    insert_after,
    insert_after_identity,
    new_element,
    read_domain_element,
    set_text,
    text_of,
)
from keeper_shared.domain_metadata import PLACEMENT_NAMESPACE
from keeper_shared.messages.tpm import Firmware, VmSpec

QEMU_DOMAIN_TYPES = ("kvm", "qemu")
"""The domain types libvirt gives an emulated TPM (its QEMU driver)."""

SHOWN_CHARS = 64
"""How much of a value from the XML a reason quotes."""

SPEC_TEXT_CHARS = 32
"""The longest architecture or machine name a VM spec holds."""


@dataclass(frozen=True)
class DomainCheck:
    """The checked domain ready to start (without its placement epoch), or why not."""

    xml: str | None
    reasons: list[str]

    @property
    def accepted(self) -> bool:
        """True when nothing conflicts."""
        return not self.reasons


@dataclass(frozen=True)
class ApprovedTpm:
    """The `<tpm>` approval gave the VM."""

    element: minidom.Element
    model: str
    version: str


def _shown(value: str) -> str:
    return repr(value if len(value) <= SHOWN_CHARS else value[:SHOWN_CHARS] + "...")


def check_manager_domain(text: str, spec: VmSpec, tpm_xml: str) -> DomainCheck:
    """Check ``text`` against the VM's approved ``spec`` and TPM element ``tpm_xml``; the
    completed domain, or every reason it conflicts."""
    try:
        root = read_domain_element(text)
    except DomainDocumentError as error:
        return DomainCheck(None, [f"domain-xml: {error}"])
    reasons: list[str] = []
    if root.getAttribute("type") not in QEMU_DOMAIN_TYPES:
        reasons.append(
            f"domain-xml: <domain type={_shown(root.getAttribute('type'))}>: the TPM emulator "
            "(swtpm) runs with QEMU domains, type 'kvm' or 'qemu'"
        )
    reasons += _identity(root, spec)
    firmware, boot_reasons = _boot(root, spec)
    reasons += boot_reasons
    reasons += _tpm(root, _approved_tpm(root, tpm_xml))
    if firmware is Firmware.UEFI:
        reasons += _nvram(root, spec.name)
    _drop_placement(root)
    if reasons:
        return DomainCheck(None, reasons)
    completed = root.toxml()
    if len(completed) > MAX_DOMAIN_XML_CHARS:
        return DomainCheck(
            None, [f"domain-xml: more than {MAX_DOMAIN_XML_CHARS:,} characters once completed"]
        )
    return DomainCheck(completed, [])


def stamp_for_start(xml: str, *, epoch: int, tpm_secret_uuid: str | None) -> str:
    """The checked domain ``xml`` with this placement's epoch in `<metadata>` (beside the
    manager's own elements) and, for a TPM the keeper encrypts, the secret the store put
    on the host in the TPM's emulator backend."""
    root = read_domain_element(xml)
    metadata = next(iter(children(root, "metadata")), None)
    if metadata is None:
        metadata = new_element(root, "metadata")
        insert_after_identity(root, metadata)
    _drop_placement(root)
    placement = document_of(root).createElementNS(PLACEMENT_NAMESPACE, "keeper:placement")
    placement.setAttribute("xmlns:keeper", PLACEMENT_NAMESPACE)
    placement.setAttribute("epoch", str(epoch))
    metadata.appendChild(placement)
    if tpm_secret_uuid is not None:
        for devices in children(root, "devices"):
            for tpm in children(devices, "tpm"):
                for backend in children(tpm, "backend"):
                    for old in children(backend, "encryption"):
                        backend.removeChild(old)
                    secret = str(uuid.UUID(tpm_secret_uuid))
                    backend.appendChild(new_element(backend, "encryption", secret=secret))
    return root.toxml()


def _one(parent: minidom.Element, tag: str, reasons: list[str]) -> minidom.Element | None:
    """``parent``'s single ``tag`` child, None without one; a second one is a reason."""
    found = children(parent, tag)
    if len(found) > 1:
        reasons.append(f"domain-xml: <{parent.tagName}> has {len(found)} <{tag}> elements")
    return found[0] if found else None


def _identity(root: minidom.Element, spec: VmSpec) -> list[str]:
    reasons: list[str] = []
    name = _one(root, "name", reasons)
    if name is None:
        name = new_element(root, "name")
        set_text(name, spec.name)
        root.insertBefore(name, root.firstChild)
    elif text_of(name) != spec.name:
        reasons.append(
            f"identity: the domain is named {_shown(text_of(name))}, the VM is registered as "
            f"{spec.name!r} (its NVRAM file is named after it)"
        )
    domain_uuid = _one(root, "uuid", reasons)
    if domain_uuid is None:
        domain_uuid = new_element(root, "uuid")
        set_text(domain_uuid, spec.vm_id)
        insert_after_identity(root, domain_uuid)
        return reasons
    try:
        same = uuid.UUID(text_of(domain_uuid)) == uuid.UUID(spec.vm_id)
    except ValueError:
        reasons.append(f"identity: the domain's UUID {_shown(text_of(domain_uuid))} is no UUID")
        return reasons
    if not same:
        reasons.append(
            f"identity: the domain's UUID is {text_of(domain_uuid)}, the VM's is {spec.vm_id}"
        )
    return reasons


def _boot(root: minidom.Element, spec: VmSpec) -> tuple[Firmware | None, list[str]]:
    """Check architecture, machine, firmware, Secure Boot and SMM as the XML has them; the
    firmware it boots (None when the XML does not say enough to tell), and the reasons."""
    reasons: list[str] = []
    os_element = _one(root, "os", reasons)
    os_type = _one(os_element, "type", reasons) if os_element is not None else None
    if os_element is None or os_type is None:
        reasons.append("domain-xml: the domain has no <os><type> (architecture, machine)")
        return None, reasons
    arch, machine = os_type.getAttribute("arch"), os_type.getAttribute("machine")
    if not arch:
        reasons.append(
            f"architecture: the domain names none (<os><type arch=...>); the VM's is {spec.arch}"
        )
    elif arch != spec.arch:
        reasons.append(
            f"architecture: the domain's is {_shown(arch)}, the VM was approved for {spec.arch}"
        )
    if not machine:
        reasons.append("machine: the domain names no machine type (<os><type machine=...>)")
    if len(arch) > SPEC_TEXT_CHARS or len(machine) > SPEC_TEXT_CHARS:
        reasons.append(f"domain-xml: an architecture or machine name over {SPEC_TEXT_CHARS} chars")
    if reasons:
        return None, reasons  # the rules below would only repeat what is missing
    loader = _one(os_element, "loader", reasons)
    uefi = (
        os_element.getAttribute("firmware") == "efi"
        or (loader is not None and loader.getAttribute("type") == "pflash")
        or bool(children(os_element, "nvram"))
    )
    firmware = Firmware.UEFI if uefi else Firmware.SLOF if arch in PPC64 else Firmware.BIOS
    secure_boot = (loader is not None and loader.getAttribute("secure") == "yes") or any(
        feature.getAttribute("name") == "secure-boot" and feature.getAttribute("enabled") == "yes"
        for selection in children(os_element, "firmware")
        for feature in children(selection, "feature")
    )
    smm = any(
        smm.getAttribute("state") != "off"
        for features in children(root, "features")
        for smm in children(features, "smm")
    )
    as_written = spec.model_copy(
        update={"machine": machine, "firmware": firmware, "secure_boot": secure_boot, "smm": smm}
    )
    reasons += hard_rule_failures(as_written)
    if secure_boot != spec.secure_boot:
        approved = "with" if spec.secure_boot else "without"
        written = "a Secure Boot" if secure_boot else "no Secure Boot"
        reasons.append(
            f"secure-boot: the VM was approved {approved} Secure Boot, the domain has "
            f"{written} loader"
        )
    return firmware, reasons


def _approved_tpm(root: minidom.Element, tpm_xml: str) -> ApprovedTpm:
    """The approved element (policy's own, from tpm.rules), ready to go into ``root``'s
    document."""
    approved = minidom.parseString(tpm_xml).documentElement  # noqa: S318 - not input
    if approved is None:
        raise ValueError("the approved TPM element is empty")
    backend = children(approved, "backend")[0]
    element = document_of(root).importNode(approved, True)
    return ApprovedTpm(element, approved.getAttribute("model"), backend.getAttribute("version"))


def _tpm(root: minidom.Element, approved: ApprovedTpm) -> list[str]:
    reasons: list[str] = []
    devices = _one(root, "devices", reasons)
    if devices is None:
        devices = new_element(root, "devices")
        root.appendChild(devices)
    tpms = children(devices, "tpm")
    if not tpms:
        devices.appendChild(approved.element)
        return reasons
    if len(tpms) > 1:
        return [f"tpm: the domain has {len(tpms)} TPM devices; the keeper keeps one"]
    tpm = tpms[0]
    model = tpm.getAttribute("model")
    if not model:
        tpm.setAttribute("model", approved.model)  # libvirt's default is the old tpm-tis
    elif model != approved.model:
        reasons.append(
            f"tpm: the domain's TPM is {_shown(model)}, the approved one {approved.model}"
        )
    backend = _one(tpm, "backend", reasons)
    if backend is None:
        backend = new_element(tpm, "backend", type="emulator", version=approved.version)
        tpm.appendChild(backend)
    kind, version = backend.getAttribute("type"), backend.getAttribute("version")
    if kind != "emulator":
        reasons.append(
            f"tpm: the domain's TPM backend is {_shown(kind)}, not the emulated TPM (swtpm) "
            "the keeper keeps"
        )
    if not version:
        backend.setAttribute("version", approved.version)  # libvirt's default varies
    elif version != approved.version:
        reasons.append(
            f"tpm-version: the domain's TPM is {_shown(version)}, the approved one "
            f"{approved.version}"
        )
    if children(backend, "encryption"):
        reasons.append(
            "tpm: the domain encrypts the TPM state with a secret of its own; the keeper "
            "encrypts it with one it keeps when the TPM is enabled with --encrypt-state"
        )
    return reasons


def _nvram(root: minidom.Element, name: str) -> list[str]:
    reasons: list[str] = []
    os_element = children(root, "os")[0]
    nvrams = children(os_element, "nvram")
    if not nvrams:
        insert_after(os_element, new_element(os_element, "nvram"), "loader")
        return reasons
    if len(nvrams) > 1:
        return [f"nvram: the domain has {len(nvrams)} <nvram> elements"]
    nvram = nvrams[0]
    expected = f"{name}_VARS.fd"
    if nvram.getAttribute("type") or element_children(nvram):
        return [
            f"nvram: the domain keeps its NVRAM in a {_shown(nvram.getAttribute('type'))} "
            f"source; the keeper restores it as the file {expected}: write <nvram/> (the host "
            "fills in the path)"
        ]
    path = text_of(nvram)
    if path and PurePosixPath(path).name != expected:
        return [
            f"nvram: the domain keeps its NVRAM in {_shown(path)}; the keeper restores it as "
            f"{expected} in the host's NVRAM directory: write <nvram/> (the host fills in the "
            "path) or a path ending in that name"
        ]
    set_text(nvram, "")  # the host fills in its own NVRAM directory
    return reasons


def _drop_placement(root: minidom.Element) -> None:
    """Remove every keeper placement element (an old epoch, from `virsh dumpxml` of a VM
    the keeper placed): the start stamps the current one."""
    for metadata in children(root, "metadata"):
        for child in element_children(metadata):
            if child.namespaceURI == PLACEMENT_NAMESPACE:
                metadata.removeChild(child)
