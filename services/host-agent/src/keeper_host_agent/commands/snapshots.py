"""Commands the host agent carries out for snapshots with memory: pause the domain, take a
libvirt snapshot, resume it (and delete a libvirt snapshot). Policy retrieves the TPM and
NVRAM state between pause and snapshot, so the state it pins is the one the memory image
expects.

Each is idempotent, because a policy replica resuming a workflow may repeat any of them:
pausing a paused domain, resuming a running one, taking a snapshot that exists and deleting
one that does not all succeed without doing anything.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from xml.sax.saxutils import escape

import libvirt
import structlog

from keeper_host_agent.hypervisor.libvirt_adapter import HypervisorError
from keeper_shared.bus.client import Delivery
from keeper_shared.messages.commands import CommandDone
from keeper_shared.messages.envelope import Envelope
from keeper_shared.messages.vm_control import (
    DeleteDomainSnapshot,
    ResumeVm,
    SnapshotDomain,
    SuspendVm,
)

log = structlog.get_logger(__name__)


def suspend(connection: libvirt.virConnect, vm_id: str) -> bool:
    """Pause the domain; False when it was paused already. Blocking."""
    domain = connection.lookupByUUIDString(vm_id)
    state, _ = domain.state()
    if state == libvirt.VIR_DOMAIN_PAUSED:
        return False
    domain.suspend()
    return True


def resume(connection: libvirt.virConnect, vm_id: str) -> bool:
    """Let a paused domain run; False when it was not paused. Blocking."""
    domain = connection.lookupByUUIDString(vm_id)
    state, _ = domain.state()
    if state != libvirt.VIR_DOMAIN_PAUSED:
        return False
    domain.resume()
    return True


def take_snapshot(connection: libvirt.virConnect, vm_id: str, name: str, description: str) -> bool:
    """Snapshot the domain as it is (memory included when active); False when a snapshot of
    that name exists. Blocking."""
    domain = connection.lookupByUUIDString(vm_id)
    if name in domain.snapshotListNames():
        return False
    xml = (
        f"<domainsnapshot><name>{escape(name)}</name>"
        f"<description>{escape(description)}</description></domainsnapshot>"
    )
    domain.snapshotCreateXML(xml, 0)
    return True


def delete_snapshot(connection: libvirt.virConnect, vm_id: str, name: str) -> bool:
    """Delete the named snapshot; False when there is none. Blocking."""
    domain = connection.lookupByUUIDString(vm_id)
    if name not in domain.snapshotListNames():
        return False
    domain.snapshotLookupByName(name).delete(0)
    return True


class SnapshotCommands:
    """Handlers of ``vm.suspend``, ``vm.resume``, ``vm.snapshot-domain`` and
    ``vm.snapshot-domain-delete``; ``connection`` returns the agent's live libvirt
    connection (it changes after a reconnect)."""

    def __init__(self, connection: Callable[[], libvirt.virConnect]) -> None:
        self._connection = connection

    async def _run(
        self, action: str, vm_id: str, call: Callable[[libvirt.virConnect], bool]
    ) -> CommandDone:
        try:
            connection = self._connection()
            changed = await asyncio.to_thread(call, connection)
        except (libvirt.libvirtError, HypervisorError) as error:
            log.warning(f"{action} failed", vm_id=vm_id, reason=str(error))
            return CommandDone(ok=False, error=str(error))
        log.info(f"{action} done", vm_id=vm_id, changed=changed)
        return CommandDone(ok=True, detail={"changed": str(changed).lower()})

    async def suspend(self, envelope: Envelope[SuspendVm], _delivery: Delivery) -> CommandDone:
        """Pause the domain."""
        vm_id = envelope.data.vm_id
        return await self._run("suspend", vm_id, lambda c: suspend(c, vm_id))

    async def resume(self, envelope: Envelope[ResumeVm], _delivery: Delivery) -> CommandDone:
        """Resume the domain."""
        vm_id = envelope.data.vm_id
        return await self._run("resume", vm_id, lambda c: resume(c, vm_id))

    async def snapshot(
        self, envelope: Envelope[SnapshotDomain], _delivery: Delivery
    ) -> CommandDone:
        """Take the libvirt snapshot."""
        request = envelope.data
        return await self._run(
            "domain snapshot",
            request.vm_id,
            lambda c: take_snapshot(c, request.vm_id, request.snapshot_id, request.description),
        )

    async def delete_snapshot(
        self, envelope: Envelope[DeleteDomainSnapshot], _delivery: Delivery
    ) -> CommandDone:
        """Delete a libvirt snapshot."""
        request = envelope.data
        return await self._run(
            "domain snapshot delete",
            request.vm_id,
            lambda c: delete_snapshot(c, request.vm_id, request.snapshot_id),
        )
