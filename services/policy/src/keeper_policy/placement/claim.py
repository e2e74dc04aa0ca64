"""``vm.claim``: a VM manager other than the keeper (virsh, virt-manager, Nova, oVirt) is
starting a VM on a host, and that host's agent asks, from libvirt's ``prepare begin`` hook,
for the placement before the state is put in place.

A registered VM becomes placed on that host. When it was placed elsewhere, the move raises
the epoch, which fences the old host exactly as policy's own placements do: its late writes
are refused by the store. A move is refused while the old host is alive and still holds the
domain (the same VM would run twice); a VM on a lost or silent host, or on none, moves.
"""

from __future__ import annotations

import time

import structlog

from keeper_policy.gateway import Gateway
from keeper_policy.hosts.registry import HostRegistry
from keeper_policy.hosts.senders import HostSenders
from keeper_policy.placement.rules import check_state_format, check_swtpm_version
from keeper_policy.settings import PolicySettings
from keeper_policy.storage.vm_registry import PlacementConflictError, PolicyRegistry, UnknownVmError
from keeper_policy.workflows.engine import WorkflowEngine
from keeper_shared.messages.host_requests import ClaimOutcome, ClaimPlacement, PlacementClaimed
from keeper_shared.messages.placement import VmPlaced

log = structlog.get_logger(__name__)


class PlacementClaims:
    """Carries out ``vm.claim``."""

    def __init__(
        self,
        settings: PolicySettings,
        registry: PolicyRegistry,
        hosts: HostRegistry,
        engine: WorkflowEngine,
        gateway: Gateway,
        senders: HostSenders,
    ) -> None:
        self._settings = settings
        self._senders = senders
        self._registry = registry
        self._hosts = hosts
        self._engine = engine
        self._gateway = gateway

    async def claim(self, request: ClaimPlacement, user_id: str | None) -> PlacementClaimed:
        """Place the VM on the requesting host, or say why not."""
        vm_id, host = request.vm_id, request.host

        def refused(reason: str) -> PlacementClaimed:
            log.warning("claim refused", vm_id=vm_id, host=host, reason=reason)
            return PlacementClaimed(vm_id=vm_id, outcome=ClaimOutcome.REFUSED, reason=reason)

        impostor = self._senders.refusal(host, user_id)
        if impostor is not None:
            return refused(impostor)
        try:
            vm = await self._registry.vm(vm_id)
        except UnknownVmError:
            return PlacementClaimed(vm_id=vm_id, outcome=ClaimOutcome.UNREGISTERED)
        previous = vm.placement.host
        if previous == host:
            return PlacementClaimed(vm_id=vm_id, outcome=ClaimOutcome.KEPT, epoch=vm.epoch)
        running = await self._engine.current(vm_id)
        if running is not None:
            return refused(f"a {running.kind} of this VM is in progress on {running.host}")
        if previous is not None:
            current = await self._hosts.host(previous)
            if (
                current is not None
                and current.alive(time.time(), self._settings.host_lost_after_s)
                and vm_id in current.inventory
            ):
                return refused(
                    f"VM is placed on {previous}, which is alive and still holds the domain; "
                    "stop and undefine it there first"
                )
        target = await self._hosts.host(host)
        swtpm = target.capabilities.swtpm_version if target is not None else None
        version = check_swtpm_version(
            host_id=host,
            host_swtpm=swtpm or "",
            last_swtpm=vm.swtpm_version,
            last_host=vm.last_host,
            override=False,
        )
        if version.refusal is not None:
            return refused(version.refusal)
        state_format = check_state_format(target, host, vm.state_profile)
        if state_format is not None:
            return refused(state_format)
        try:
            epoch = await self._registry.place(vm_id, host, expected_host=previous)
        except PlacementConflictError as error:
            return refused(f"{error}; start it again")
        await self._registry.note_placed(vm_id, host, swtpm)
        # Another manager started it: its domain is that manager's, so a stop retrieves the
        # state and fences the host but never undefines the domain (as for adopted VMs).
        await self._registry.mark_adopted(vm_id, host)
        await self._gateway.publish(
            VmPlaced(vm_id=vm_id, host=host, epoch=epoch, swtpm_version=swtpm), vm_id
        )
        log.info(
            "VM placed by a start on its host",
            vm_id=vm_id,
            host=host,
            epoch=epoch,
            previous=previous,
        )
        return PlacementClaimed(
            vm_id=vm_id, outcome=ClaimOutcome.MOVED, epoch=epoch, previous_host=previous
        )
