"""``vm.snapshot-delete``: a snapshot with memory is deleted on its host first (libvirt's
record and the memory file), then policy forgets it and the store unpins its versions.

The memory file is the guest's whole memory, keys the TPM released to it included, so it
must not outlive the snapshot: while its host cannot be reached the deletion is refused and
nothing is deleted (the operator asks again). A host declared lost cannot be reached at all;
the snapshot is deleted anyway and the reply names the host that still holds the file.
Every step is idempotent, so a deletion cut short is finished by asking again.
"""

from __future__ import annotations

from dataclasses import dataclass

import structlog

from keeper_policy.gateway import Gateway
from keeper_policy.hosts.registry import HostRegistry
from keeper_policy.snapshot.memory_records import MemorySnapshot, MemorySnapshots
from keeper_policy.workflows.engine import WorkflowEngine
from keeper_shared.bus.client import Delivery, Route
from keeper_shared.bus.topology import STATE_STORE
from keeper_shared.messages.envelope import Envelope
from keeper_shared.messages.replies import (
    DeleteDomainSnapshotReply,
    DeleteSnapshotReply,
    DeleteVmSnapshotReply,
)
from keeper_shared.messages.snapshot import DeleteSnapshot
from keeper_shared.messages.vm_control import DeleteDomainSnapshot
from keeper_shared.messages.vm_snapshot import DeleteVmSnapshot

log = structlog.get_logger(__name__)


class MemoryNotDeletedError(Exception):
    """The snapshot's host did not delete its memory; the reason is safe to show."""


@dataclass(frozen=True)
class MemoryDeletion:
    """Where a snapshot's memory was deleted, or which lost host still holds it."""

    deleted_on: str | None = None
    left_on: str | None = None


class SnapshotDeleter:
    """Carries out ``vm.snapshot-delete``, and deletes the memory of every snapshot of a VM
    whose stored state was deleted."""

    def __init__(
        self,
        records: MemorySnapshots,
        hosts: HostRegistry,
        engine: WorkflowEngine,
        gateway: Gateway,
        *,
        store_timeout_s: float,
        store_target: str = STATE_STORE,
    ) -> None:
        self._records = records
        self._hosts = hosts
        self._engine = engine
        self._gateway = gateway
        self._store_timeout_s = store_timeout_s
        self._store = store_target

    def command_routes(self) -> list[Route]:
        """The route of ``vm.snapshot-delete`` on policy's commands queue."""
        return [Route(DeleteVmSnapshot, self.on_delete)]

    async def on_delete(
        self, envelope: Envelope[DeleteVmSnapshot], _delivery: Delivery
    ) -> DeleteVmSnapshotReply:
        """Delete a snapshot: its memory file on its host first, then the store's pin."""
        return await self.delete(envelope.data)

    async def delete(self, request: DeleteVmSnapshot) -> DeleteVmSnapshotReply:
        """Delete the snapshot's memory (if it has any), then its pin; a refusal says why
        and deletes nothing."""
        vm_id = request.vm_id
        running = await self._engine.current(vm_id)
        if running is not None:
            # A revert or snapshot in progress may be using this very snapshot.
            return DeleteVmSnapshotReply.failed(
                f"a {running.kind} of VM {vm_id} is in progress; try again later"
            )
        record = await self._records.get(vm_id, request.snapshot_id)
        memory = MemoryDeletion()
        if record is not None:
            try:
                memory = await self.delete_memory(vm_id, record)
            except MemoryNotDeletedError as error:
                return DeleteVmSnapshotReply.failed(f"{error}; nothing was deleted")
            await self._records.forget(vm_id, request.snapshot_id)
        unpinned = await self._gateway.call(
            self._store,
            DeleteSnapshot(vm_id=vm_id, snapshot_id=request.snapshot_id),
            DeleteSnapshotReply,
            vm_id,
            self._store_timeout_s,
        )
        if not unpinned.ok:
            return DeleteVmSnapshotReply.failed(
                f"the store did not delete the snapshot: {unpinned.error}",
                timed_out=unpinned.timed_out,
            )
        log.info(
            "snapshot deleted",
            vm_id=vm_id,
            snapshot_id=request.snapshot_id,
            memory_deleted_on=memory.deleted_on,
            memory_left_on=memory.left_on,
        )
        return DeleteVmSnapshotReply(
            ok=True,
            deleted=unpinned.deleted or record is not None,
            memory_deleted_on=memory.deleted_on,
            memory_left_on=memory.left_on,
        )

    async def delete_memory(self, vm_id: str, record: MemorySnapshot) -> MemoryDeletion:
        """Have the snapshot's host delete it, memory file included; raise
        MemoryNotDeletedError when it did not, unless the host is lost (then the file is
        left where it is, and said so)."""
        host = await self._hosts.host(record.host)
        if host is None or host.lost_at is not None:
            log.warning(
                "snapshot memory left on a lost host",
                vm_id=vm_id,
                snapshot_id=record.snapshot_id,
                host=record.host,
            )
            return MemoryDeletion(left_on=record.host)
        reply = await self._gateway.host(
            record.host,
            DeleteDomainSnapshot(vm_id=vm_id, snapshot_id=record.snapshot_id),
            DeleteDomainSnapshotReply,
            vm_id,
        )
        if not reply.ok:
            raise MemoryNotDeletedError(
                f"host {record.host} did not delete the snapshot's memory: {reply.error}"
            )
        return MemoryDeletion(deleted_on=record.host)

    async def forget_vm(self, vm_id: str) -> None:
        """The store deleted the VM's state, its snapshots' pins with it: delete each
        snapshot's memory where it can be, say where it could not, forget them all."""
        for record in await self._records.all(vm_id):
            try:
                await self.delete_memory(vm_id, record)
            except MemoryNotDeletedError as error:
                log.warning(
                    "snapshot memory not deleted; remove its file on the host",
                    vm_id=vm_id,
                    snapshot_id=record.snapshot_id,
                    host=record.host,
                    reason=str(error),
                )
        await self._records.forget_vm(vm_id)
