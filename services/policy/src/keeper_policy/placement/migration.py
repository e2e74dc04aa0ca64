"""Live migration, seen from policy: libvirt reports the domain stopped (migrated) on the
source and started on the destination, in either order and maybe to different replicas.
When both halves are in, the placement moves to the destination under a new epoch, which
fences the source: its late writes are refused by the store.

The destination still runs the domain under the old epoch (the domain XML travelled with
it), so it is told the new one (``vm.set-epoch``) and announces its state under it; until it
confirms, every heartbeat of it that shows the old epoch repeats the command. The source
keeps an inactive definition and the state files; it is told to remove them, nothing
retrieved (the destination holds the live state).
"""

from __future__ import annotations

import structlog

from keeper_policy.gateway import Gateway
from keeper_policy.hosts.registry import HostRegistry
from keeper_policy.storage.vm_registry import PolicyRegistry
from keeper_shared.messages.host import HostHeartbeat
from keeper_shared.messages.placement import VmEvicted, VmMigrated
from keeper_shared.messages.replies import SetPlacementEpochReply
from keeper_shared.messages.vm import VmStarted, VmStopped
from keeper_shared.messages.vm_control import SetPlacementEpoch

log = structlog.get_logger(__name__)

LEFT = "left"
ARRIVED = "arrived"


class MigrationTracker:
    """Moves placements after live migrations."""

    def __init__(
        self,
        registry: PolicyRegistry,
        hosts: HostRegistry,
        gateway: Gateway,
        *,
        window_s: float,
    ) -> None:
        self._registry = registry
        self._hosts = hosts
        self._gateway = gateway
        self._window_s = window_s
        self._telling: set[tuple[str, int]] = set()

    async def source_left(self, event: VmStopped) -> None:
        """The placement host reports the domain migrated away."""
        if (await self._registry.placement(event.vm_id)).host != event.host:
            return  # not the VM's placement: nothing of ours moved
        await self._half(event.vm_id, LEFT, event.host)

    async def maybe_arrived(self, event: VmStarted) -> None:
        """A host started a domain: if it is not the VM's placement, it may be a migration's
        destination."""
        placement = await self._registry.placement(event.vm_id)
        if placement.host is None or placement.host == event.host:
            return
        await self._half(event.vm_id, ARRIVED, event.host)

    async def _half(self, vm_id: str, role: str, host: str) -> None:
        outcome, detail = await self._registry.migrate_half(vm_id, role, host, self._window_s)
        if outcome == "ignored":
            log.info("migration half ignored", vm_id=vm_id, role=role, host=host, why=detail[0])
        if outcome != "moved":
            return
        epoch, source, destination = int(detail[0]), detail[1], detail[2]
        log.info(
            "placement moved by migration",
            vm_id=vm_id,
            source=source,
            destination=destination,
            epoch=epoch,
        )
        target = await self._hosts.host(destination)
        swtpm = target.capabilities.swtpm_version if target else None
        await self._registry.note_placed(vm_id, destination, swtpm)
        await self._gateway.publish(
            VmMigrated(vm_id=vm_id, source=source, destination=destination, epoch=epoch), vm_id
        )
        await self._tell_epoch(vm_id, destination, epoch)
        removed = await self._gateway.evict(vm_id, source)
        if removed.ok:
            await self._gateway.publish(
                VmEvicted(vm_id=vm_id, host=source, placed_on=destination), vm_id
            )
        else:
            await self._hosts.add_cleanup(source, [vm_id])

    async def on_heartbeat(self, beat: HostHeartbeat) -> None:
        """Confirm or repeat a pending epoch for the VMs this host reports."""
        pending = await self._registry.epoch_pending()
        for entry in beat.vms:
            if entry.vm_id not in pending:
                continue
            placement = await self._registry.placement(entry.vm_id)
            if (
                placement.epoch_pending
                and placement.host == beat.host
                and (entry.epoch < placement.epoch)
            ):
                await self._tell_epoch(entry.vm_id, beat.host, placement.epoch)
            else:
                await self._registry.confirm_epoch(entry.vm_id, beat.host, entry.epoch)

    async def _tell_epoch(self, vm_id: str, host: str, epoch: int) -> None:
        if (vm_id, epoch) in self._telling:
            return  # this replica is already telling it
        self._telling.add((vm_id, epoch))
        try:
            result = await self._gateway.host(
                host, SetPlacementEpoch(vm_id=vm_id, epoch=epoch), SetPlacementEpochReply, vm_id
            )
        finally:
            self._telling.discard((vm_id, epoch))
        if result.ok:
            log.info(
                "destination runs the VM under its new epoch", vm_id=vm_id, host=host, epoch=epoch
            )
        else:
            log.warning(
                "destination not told its new epoch yet; retried on its heartbeat",
                vm_id=vm_id,
                host=host,
                reason=result.error,
            )
