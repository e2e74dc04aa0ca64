"""Commands the host agent carries out for snapshots with memory: pause the domain, take a
libvirt snapshot (its memory in ``<snapshot_dir>/<vm-uuid>/<snapshot>.mem``), resume it,
and delete a snapshot with its memory file. Policy retrieves the TPM and NVRAM state between
pause and snapshot, so the state it pins is the one the memory image expects; the
snapshot's XML goes back to policy in the reply, for a revert after an undefine.

Each is idempotent, because a policy replica resuming a workflow may repeat any of them:
pausing a paused domain, resuming a running one, taking a snapshot that exists and deleting
one that does not all succeed without doing anything.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from pathlib import Path
from typing import TypeVar

import structlog

from keeper_host_agent.hypervisor.errors import DomainNotFoundError, HypervisorError
from keeper_host_agent.hypervisor.port import Hypervisor
from keeper_shared.bus.client import Delivery
from keeper_shared.messages.envelope import Envelope
from keeper_shared.messages.replies import (
    DeleteDomainSnapshotReply,
    DomainChangeReply,
    ResumeVmReply,
    SnapshotDomainReply,
    SuspendVmReply,
)
from keeper_shared.messages.vm_control import (
    DeleteDomainSnapshot,
    ResumeVm,
    SnapshotDomain,
    SuspendVm,
)

log = structlog.get_logger(__name__)

ChangeT = TypeVar("ChangeT", bound=DomainChangeReply)


async def suspend(hypervisor: Hypervisor, vm_id: str) -> bool:
    """Pause the domain; False when it was paused already."""
    if await hypervisor.is_paused(vm_id):
        return False
    await hypervisor.suspend(vm_id)
    return True


async def resume(hypervisor: Hypervisor, vm_id: str) -> bool:
    """Let a paused domain run; False when it was not paused."""
    if not await hypervisor.is_paused(vm_id):
        return False
    await hypervisor.resume(vm_id)
    return True


def memory_file(snapshot_dir: Path, vm_id: str, name: str) -> Path:
    """Where the memory of the VM's snapshot ``name`` goes on this host."""
    return snapshot_dir / vm_id / f"{name}.mem"


async def take_snapshot(
    hypervisor: Hypervisor, vm_id: str, name: str, description: str, snapshot_dir: Path
) -> bool:
    """Snapshot the domain as it is (memory included when active); False when a snapshot of
    that name exists."""
    if name in await hypervisor.snapshot_names(vm_id):
        return False
    target = memory_file(snapshot_dir, vm_id, name)
    # Only root (libvirtd) reads it: it is the guest's whole memory.
    await asyncio.to_thread(target.parent.mkdir, mode=0o700, parents=True, exist_ok=True)
    await hypervisor.create_snapshot(vm_id, name, description, target)
    return True


async def delete_snapshot(
    hypervisor: Hypervisor, vm_id: str, name: str, snapshot_dir: Path
) -> bool:
    """Delete the named snapshot and its memory file; False when there was neither. The
    domain may be gone (an undefine drops libvirt's snapshots, not the memory file)."""
    try:
        defined = name in await hypervisor.snapshot_names(vm_id)
    except DomainNotFoundError:
        defined = False
    if defined:
        await hypervisor.delete_snapshot(vm_id, name)
    # The guest's whole memory, keys the TPM released to it included: it must not outlive
    # the snapshot that needed it.
    target = memory_file(snapshot_dir, vm_id, name)
    removed = await asyncio.to_thread(_remove_memory_file, target)
    return defined or removed


def _remove_memory_file(target: Path) -> bool:
    """Remove ``target`` and its VM's directory once empty; False when it was not there."""
    try:
        target.unlink()
    except FileNotFoundError:
        return False
    with contextlib.suppress(OSError):  # the VM's other snapshots still live there
        target.parent.rmdir()
    return True


class SnapshotCommands:
    """Handlers of ``vm.suspend``, ``vm.resume``, ``vm.snapshot-domain`` and
    ``vm.snapshot-domain-delete``."""

    def __init__(self, hypervisor: Hypervisor, snapshot_dir: Path) -> None:
        self._hypervisor = hypervisor
        self._snapshot_dir = snapshot_dir

    async def _run(
        self, action: str, vm_id: str, call: Awaitable[bool], reply: type[ChangeT]
    ) -> ChangeT:
        try:
            changed = await call
        except (HypervisorError, OSError) as error:
            log.warning(f"{action} failed", vm_id=vm_id, reason=str(error))
            return reply.failed(str(error))
        log.info(f"{action} done", vm_id=vm_id, changed=changed)
        return reply(ok=True, changed=changed)

    async def suspend(self, envelope: Envelope[SuspendVm], _delivery: Delivery) -> SuspendVmReply:
        """Pause the domain."""
        vm_id = envelope.data.vm_id
        return await self._run("suspend", vm_id, suspend(self._hypervisor, vm_id), SuspendVmReply)

    async def resume(self, envelope: Envelope[ResumeVm], _delivery: Delivery) -> ResumeVmReply:
        """Resume the domain."""
        vm_id = envelope.data.vm_id
        return await self._run("resume", vm_id, resume(self._hypervisor, vm_id), ResumeVmReply)

    async def snapshot(
        self, envelope: Envelope[SnapshotDomain], _delivery: Delivery
    ) -> SnapshotDomainReply:
        """Take the libvirt snapshot; the reply carries its XML (secure), which policy keeps
        so the snapshot can be redefined after the domain was undefined."""
        request = envelope.data
        taken = await self._run(
            "domain snapshot",
            request.vm_id,
            take_snapshot(
                self._hypervisor,
                request.vm_id,
                request.snapshot_id,
                request.description,
                self._snapshot_dir,
            ),
            SnapshotDomainReply,
        )
        if not taken.ok:
            return taken
        try:
            xml = await self._hypervisor.snapshot_xml(request.vm_id, request.snapshot_id)
        except HypervisorError as error:
            log.warning("domain snapshot XML unreadable", vm_id=request.vm_id, reason=str(error))
            return SnapshotDomainReply.failed(str(error))
        return taken.model_copy(update={"snapshot_xml": xml})

    async def delete_snapshot(
        self, envelope: Envelope[DeleteDomainSnapshot], _delivery: Delivery
    ) -> DeleteDomainSnapshotReply:
        """Delete a snapshot: libvirt's record and its memory file."""
        request = envelope.data
        return await self._run(
            "domain snapshot delete",
            request.vm_id,
            delete_snapshot(
                self._hypervisor, request.vm_id, request.snapshot_id, self._snapshot_dir
            ),
            DeleteDomainSnapshotReply,
        )
