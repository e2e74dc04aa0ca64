"""Snapshots with memory on libvirt: taking one (memory to an external file) and reverting
to one, on a domain that may have been undefined and defined again since.

Why external memory: libvirt refuses internal (``savevm``) snapshots of a domain with a
pflash firmware, which every UEFI VM with a TPM has; an external memory snapshot is allowed
and its memory file is a libvirt save image (the same format as ``virsh save``).

Why a restore instead of ``virDomainRevertToSnapshot``: libvirt reverts external snapshots
only from 9.9 on. A snapshot whose only external part is its memory (no disk overlays) is
brought back just as well by restoring its memory file, which every libvirt can; a snapshot
with disk overlays needs libvirt's own revert. Either way the domain comes back paused, gets
its new placement epoch, then runs.

Why the snapshot XML is kept elsewhere: an undefine drops libvirt's snapshot metadata (the
keeper undefines with ``VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA``), while the memory file
stays where it is; policy keeps the XML and the revert redefines the snapshot from it.

These functions run in a worker thread on the agent's connection (see libvirt_adapter).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

import libvirt

from keeper_host_agent.hypervisor.errors import InvalidArgumentError

_SECURE = libvirt.VIR_DOMAIN_SNAPSHOT_XML_SECURE


def create_memory_snapshot(
    domain: libvirt.virDomain, name: str, description: str, memory_file: Path
) -> None:
    """Snapshot ``domain``; when it is active, with its memory in ``memory_file``."""
    memory = (
        f"<memory snapshot='external' file={quoteattr(str(memory_file))}/>"
        if domain.isActive()
        else ""
    )
    domain.snapshotCreateXML(
        f"<domainsnapshot><name>{escape(name)}</name>"
        f"<description>{escape(description)}</description>{memory}</domainsnapshot>",
        0,
    )


def snapshot_xml(domain: libvirt.virDomain, name: str) -> str:
    """The snapshot's XML with its secure details, as a redefine needs it."""
    return str(domain.snapshotLookupByName(name).getXMLDesc(_SECURE))


def memory_parts(xml: str) -> tuple[str | None, bool]:
    """The snapshot's external memory file (None without one) and whether it has external
    disk overlays."""
    root = ET.fromstring(xml)  # noqa: S314 - libvirt's own serialisation, or what it gave us
    memory = root.find("memory")
    memory_file = (
        memory.get("file") if memory is not None and memory.get("snapshot") == "external" else None
    )
    overlays = any(disk.get("snapshot") == "external" for disk in root.iterfind("disks/disk"))
    return memory_file, overlays


def delete_memory_snapshot(domain: libvirt.virDomain, name: str) -> None:
    """Delete snapshot ``name``. One whose only external part is its memory loses its
    metadata only, and the memory file is the caller's to remove (the agent knows where it
    put it, whatever libvirt's version does with external snapshots). One with disk
    overlays needs libvirt's own delete, which merges them."""
    snapshot = domain.snapshotLookupByName(name)
    _memory, overlays = memory_parts(snapshot.getXMLDesc(_SECURE))
    if overlays:
        snapshot.delete(0)
        return
    try:
        snapshot.delete(libvirt.VIR_DOMAIN_SNAPSHOT_DELETE_METADATA_ONLY)
    except libvirt.libvirtError as error:
        if error.get_error_code() != libvirt.VIR_ERR_INVALID_ARG:
            raise
        # A driver without metadata-only deletion (the test driver) keeps no data of its
        # own for the snapshot: its ordinary delete drops the record.
        snapshot.delete(0)


def revert_with_memory(
    connection: libvirt.virConnect,
    domain_xml: str,
    saved_snapshot_xml: str,
    name: str,
    metadata: tuple[str, str, str],
) -> None:
    """Define the domain, redefine snapshot ``name`` when it lacks it, bring its memory
    back paused, write ``metadata`` (element, prefix, namespace), resume.
    """
    domain = connection.defineXML(domain_xml)
    if domain.isActive():
        raise InvalidArgumentError("the domain runs: it must be off before a revert")
    if name not in domain.snapshotListNames():
        domain.snapshotCreateXML(saved_snapshot_xml, libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_REDEFINE)
    snapshot = domain.snapshotLookupByName(name)
    memory_file, overlays = memory_parts(snapshot.getXMLDesc(_SECURE))
    if memory_file is None:
        raise InvalidArgumentError(f"snapshot {name} holds no memory")
    if overlays:
        domain.revertToSnapshot(snapshot, libvirt.VIR_DOMAIN_SNAPSHOT_REVERT_PAUSED)
    else:
        connection.restoreFlags(memory_file, None, libvirt.VIR_DOMAIN_SAVE_PAUSED)
        domain = connection.lookupByUUIDString(domain.UUIDString())
    element, prefix, namespace = metadata
    domain.setMetadata(
        libvirt.VIR_DOMAIN_METADATA_ELEMENT,
        element,
        prefix,
        namespace,
        libvirt.VIR_DOMAIN_AFFECT_LIVE | libvirt.VIR_DOMAIN_AFFECT_CONFIG,
    )
    domain.resume()
