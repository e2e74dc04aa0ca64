"""Policy's decisions and workflows: approve TPMs, place VMs, stop them keeping their state.

Every step that waits on another service is a bounded call, so no workflow can block
forever (invariant 7): a stop retrieves at most ``retrieve_attempts`` times and then destroys
anyway, recording the possible loss.
"""

from __future__ import annotations

import time

import structlog

from keeper_policy.approval import decide_tpm
from keeper_policy.domain_definition import domain_xml
from keeper_policy.registry import PolicyRegistry, UnknownVmError
from keeper_policy.settings import PolicySettings
from keeper_shared.bus.client import BusClient, CallError, Delivery
from keeper_shared.bus.topology import STATE_STORE, host_command_key
from keeper_shared.messages.commands import CommandDone
from keeper_shared.messages.envelope import Envelope, Payload
from keeper_shared.messages.host import HostHeartbeat
from keeper_shared.messages.placement import (
    PlaceVm,
    StateLossRecorded,
    StopMode,
    StopVm,
    VmPlaced,
    VmRetired,
)
from keeper_shared.messages.state import RestoreState, RetrieveState, StatePersisted
from keeper_shared.messages.tpm import EnableTpm, TpmApproved, TpmRejected
from keeper_shared.messages.vm import PowerOffVm, ShutdownVm, StartVm, UndefineVm

log = structlog.get_logger(__name__)


class PolicyService:
    """Handlers of one policy replica."""

    def __init__(self, settings: PolicySettings, registry: PolicyRegistry, bus: BusClient) -> None:
        self._settings = settings
        self._registry = registry
        self._bus = bus

    async def on_enable_tpm(self, envelope: Envelope[EnableTpm], delivery: Delivery) -> CommandDone:
        """Approve or reject a TPM; an approval registers the VM."""
        request = envelope.data
        now = time.time()
        cluster = {
            host.host: host.capabilities
            for host in await self._registry.hosts()
            if now - host.last_seen <= self._settings.host_lost_after_s
        }
        decision = decide_tpm(
            request.spec,
            guest_os_rules=self._settings.guest_os_tpm,
            cluster=cluster,
            override=request.override,
        )
        vm_id = request.spec.vm_id
        if decision.tpm_xml is None:
            await self._bus.publish_event(
                TpmRejected(vm_id=vm_id, reasons=decision.reasons), subject=vm_id
            )
            log.info("TPM rejected", vm_id=vm_id, reasons=decision.reasons)
            return CommandDone(ok=False, error="; ".join(decision.reasons))
        await self._registry.register_vm(request.spec, decision.tpm_xml)
        await self._bus.publish_event(
            TpmApproved(vm_id=vm_id, tpm_xml=decision.tpm_xml, overridden=decision.overridden),
            subject=vm_id,
        )
        log.info("TPM approved", vm_id=vm_id, overridden=decision.overridden)
        return CommandDone(ok=True, detail={"tpm_xml": decision.tpm_xml})

    async def on_place(self, envelope: Envelope[PlaceVm], delivery: Delivery) -> CommandDone:
        """New epoch, state put in place on the host by the store, then start."""
        request = envelope.data
        try:
            vm = await self._registry.vm(request.vm_id)
        except UnknownVmError as error:
            return CommandDone(ok=False, error=str(error))
        if vm.host == request.host:
            # A redelivered or repeated request: the VM already runs there (invariant 8).
            return CommandDone(ok=True, detail={"epoch": str(vm.epoch), "note": "already placed"})
        if vm.host is not None:
            return CommandDone(ok=False, error=f"VM is placed on {vm.host}; stop it there first")
        epoch = await self._registry.place(request.vm_id, request.host)
        restore = await self._call(
            STATE_STORE,
            RestoreState(vm_id=request.vm_id, name=vm.spec.name, host=request.host, epoch=epoch),
            request.vm_id,
            self._settings.host_command_timeout_s,
        )
        if not restore.ok:
            await self._registry.unplace(request.vm_id)
            return CommandDone(ok=False, error=f"prepare on {request.host} failed: {restore.error}")
        xml = domain_xml(
            vm.spec,
            tpm_xml=vm.tpm_xml,
            epoch=epoch,
            ovmf_code=self._settings.ovmf_code,
            ovmf_vars_template=self._settings.ovmf_vars_template,
        )
        started = await self._call(
            host_command_key(request.host),
            StartVm(vm_id=request.vm_id, epoch=epoch, domain_xml=xml),
            request.vm_id,
            self._settings.host_command_timeout_s,
        )
        if not started.ok:
            await self._registry.unplace(request.vm_id)
            return CommandDone(ok=False, error=f"start on {request.host} failed: {started.error}")
        await self._bus.publish_event(
            VmPlaced(vm_id=request.vm_id, host=request.host, epoch=epoch), subject=request.vm_id
        )
        log.info("VM placed", vm_id=request.vm_id, host=request.host, epoch=epoch)
        return CommandDone(ok=True, detail={"epoch": str(epoch), **restore.detail})

    async def on_stop(self, envelope: Envelope[StopVm], delivery: Delivery) -> CommandDone:
        """Stop a VM keeping its final state: shutdown retrieves after the guest is down;
        power-off retrieves while it still runs. Then the domain and its local state go."""
        request = envelope.data
        try:
            vm = await self._registry.vm(request.vm_id)
        except UnknownVmError as error:
            return CommandDone(ok=False, error=str(error))
        if vm.host is None:
            return CommandDone(ok=True, detail={"note": "VM is not running anywhere"})
        host_key = host_command_key(vm.host)
        timeout = self._settings.host_command_timeout_s
        if request.mode is StopMode.SHUTDOWN:
            down = await self._call(
                host_key,
                ShutdownVm(vm_id=request.vm_id, timeout_s=timeout * 0.8),
                request.vm_id,
                timeout,
            )
            if not down.ok:
                return CommandDone(ok=False, error=f"shutdown failed: {down.error}")
            retrieved = await self._retrieve(request.vm_id, vm.host)
        else:
            retrieved = await self._retrieve(request.vm_id, vm.host)
            down = await self._call(
                host_key, PowerOffVm(vm_id=request.vm_id), request.vm_id, timeout
            )
            if not down.ok:
                return CommandDone(ok=False, error=f"power-off failed: {down.error}")
        if not retrieved:
            fresh = await self._registry.vm(request.vm_id)
            age = time.time() - fresh.last_persisted_at if fresh.last_persisted_at else None
            await self._bus.publish_event(
                StateLossRecorded(
                    vm_id=request.vm_id,
                    host=vm.host,
                    attempts=self._settings.retrieve_attempts,
                    last_persisted_age_s=age,
                ),
                subject=request.vm_id,
            )
            log.warning(
                "final state not retrieved; destroying anyway",
                vm_id=request.vm_id,
                last_persisted_age_s=age,
            )
        # No host may write this VM's state from here on, not even a late fetch reply.
        await self._registry.unplace(request.vm_id)
        removed = await self._call(
            host_key, UndefineVm(vm_id=request.vm_id, wipe_state=True), request.vm_id, timeout
        )
        await self._bus.publish_event(
            VmRetired(vm_id=request.vm_id, host=vm.host, retrieved=retrieved), subject=request.vm_id
        )
        if not removed.ok:
            return CommandDone(ok=False, error=f"undefine failed: {removed.error}")
        return CommandDone(ok=True, detail={"retrieved": str(retrieved).lower()})

    async def _retrieve(self, vm_id: str, host: str) -> bool:
        """Have the store pull the VM's current state; bounded attempts and time."""
        for attempt in range(1, self._settings.retrieve_attempts + 1):
            result = await self._call(
                STATE_STORE,
                RetrieveState(vm_id=vm_id, host=host),
                vm_id,
                self._settings.retrieve_timeout_s,
            )
            if result.ok:
                log.info(
                    "final state retrieved", vm_id=vm_id, attempt=attempt, versions=result.detail
                )
                return True
            log.warning("retrieval failed", vm_id=vm_id, attempt=attempt, reason=result.error)
        return False

    async def _call(
        self, target: str, payload: Payload, vm_id: str, timeout_s: float
    ) -> CommandDone:
        try:
            reply = await self._bus.call(
                target, payload, CommandDone, subject=vm_id, timeout_s=timeout_s
            )
        except CallError as error:
            return CommandDone(ok=False, error=str(error))
        return reply.data

    async def on_heartbeat(self, envelope: Envelope[HostHeartbeat], delivery: Delivery) -> None:
        """Remember the host as alive, with its capabilities."""
        await self._registry.note_heartbeat(envelope.data)

    async def on_persisted(self, envelope: Envelope[StatePersisted], delivery: Delivery) -> None:
        """Track the recovery point of each VM."""
        await self._registry.note_persisted(envelope.data.vm_id, envelope.time.timestamp())
