"""Adopting domains hosts report (``vm.discovered``): by the host's mode or on request
(``vm.adopt``), always through the approval rules.

An adopted VM is registered from its XML and placed on the host that holds it under a new
epoch; the host is told the epoch (``vm.set-epoch``), stamps it into the domain's metadata
and announces its state under it, which the store then pulls. The domain is never
redefined, restarted or undefined for it. Until the host confirms the epoch, its heartbeats
repeat it (as after a live migration). A domain that is not adopted (the rules refuse it,
or the host adopts only on request) is recorded with the reasons and left alone.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import structlog

from keeper_policy.adoption.records import DiscoveredDomains, DiscoveredRecord
from keeper_policy.adoption.spec import (
    adoption_spec,
    adopts_by_itself,
    explain_guest_os,
    not_by_itself_reason,
)
from keeper_policy.gateway import Gateway
from keeper_policy.hosts.registry import HostRecord, HostRegistry
from keeper_policy.settings import PolicySettings
from keeper_policy.storage.vm_registry import (
    PlacementConflictError,
    PolicyRegistry,
    UnknownVmError,
)
from keeper_policy.tpm.rules import ClusterView, Overrides, decide_tpm
from keeper_shared.messages.adoption import AdoptVm, VmAdopted, VmAdoptionResult, VmDiscovered
from keeper_shared.messages.host import HostHeartbeat
from keeper_shared.messages.replies import SetPlacementEpochReply
from keeper_shared.messages.vm import VmStarted, VmUndefined
from keeper_shared.messages.vm_control import SetPlacementEpoch

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class AdoptionRequest:
    """What a ``vm.adopt`` adds to a host's report."""

    guest_os: str | None
    overrides: Overrides
    requested_by: str


class Adopter:
    """Decides and carries out adoptions."""

    def __init__(
        self,
        settings: PolicySettings,
        registry: PolicyRegistry,
        hosts: HostRegistry,
        gateway: Gateway,
        records: DiscoveredDomains,
    ) -> None:
        self._settings = settings
        self._registry = registry
        self._hosts = hosts
        self._gateway = gateway
        self._records = records

    async def on_discovered(self, fact: VmDiscovered, reported_at: float) -> None:
        """A host reports a domain vTPM Keeper did not place: adopt it if its mode says so,
        else record why not. Reported again (a reconnect) it is decided again."""
        placement = await self._registry.placement(fact.vm_id)
        if placement.host == fact.host and placement.epoch > 0:
            # Adopted here already; the domain has not taken its epoch yet.
            await self._records.forget(fact.vm_id)
            await self._tell_epoch(fact.vm_id, fact.host, placement.epoch)
            return
        if placement.host is not None:
            reason = f"placement: the VM is placed on {placement.host}, not on {fact.host}"
            await self._records.note(DiscoveredRecord(fact, [reason], reported_at))
            return
        host = await self._live_host(fact.host)
        if host is None:
            reason = f"adoption: waiting for the first heartbeat of host {fact.host}"
            await self._records.note(DiscoveredRecord(fact, [reason], reported_at))
            await self._records.wait_for_heartbeat(fact.host)
            return
        result = await self._decide(fact, host, reported_at, None)
        if not result.adopted:
            log.info("domain not adopted", vm_id=fact.vm_id, host=fact.host, reasons=result.reasons)

    async def on_heartbeat(self, beat: HostHeartbeat) -> None:
        """Decide the reports that waited for this host's first heartbeat."""
        if not await self._records.take_waiting(beat.host):
            return
        for record in await self._records.all():
            if record.fact.host == beat.host:
                await self.on_discovered(record.fact, record.reported_at)

    async def on_undefined(self, event: VmUndefined) -> None:
        """A reported domain is gone from its host: nothing is left to adopt."""
        await self._records.forget(event.vm_id, event.host)

    async def on_started(self, event: VmStarted) -> None:
        """An adopted VM its manager starts again (after a stop unplaced it) is placed on
        the host it runs on again."""
        placement = await self._registry.placement(event.vm_id)
        if placement.host is not None:
            return
        try:
            vm = await self._registry.vm(event.vm_id)
        except UnknownVmError:
            return
        host = await self._live_host(event.host)
        if vm.adopted_on is None or host is None:
            return
        epoch = await self._place(event.vm_id, host)
        if epoch is not None:
            await self._announce(event.vm_id, host.host, epoch, None, [])

    async def adopt(self, request: AdoptVm, requested_by: str) -> VmAdoptionResult:
        """``vm.adopt``: adopt the domain named, whatever its host's mode."""
        found = await self._records.named(request.vm, request.host)
        if not found:
            return await self._already_adopted(request)
        if len(found) > 1:
            hosts = ", ".join(sorted(record.fact.host for record in found))
            return VmAdoptionResult(
                adopted=False,
                vm_id=None,
                reasons=[f"ambiguous: hosts {hosts} report {request.vm}; name the host"],
            )
        (record,) = found
        host = await self._live_host(record.fact.host)
        if host is None:
            return VmAdoptionResult(
                adopted=False,
                vm_id=record.fact.vm_id,
                name=record.fact.name,
                reasons=[f"host: {record.fact.host} is not alive"],
            )
        asked = AdoptionRequest(
            guest_os=request.guest_os,
            overrides=Overrides(cluster=request.override, guest_os=request.override_guest_os),
            requested_by=requested_by,
        )
        return await self._decide(record.fact, host, time.time(), asked)

    async def _already_adopted(self, request: AdoptVm) -> VmAdoptionResult:
        try:
            vm = await self._registry.vm(request.vm)
        except UnknownVmError:
            vm = None
        if vm is not None and vm.host is not None:
            return VmAdoptionResult(
                adopted=True, vm_id=vm.spec.vm_id, name=vm.spec.name, host=vm.host, epoch=vm.epoch
            )
        where = f" on {request.host}" if request.host else ""
        return VmAdoptionResult(
            adopted=False,
            vm_id=None,
            reasons=[
                f"unknown: no host{where} reports an unprotected TPM domain {request.vm!r} "
                "(see `keeper vm status`)"
            ],
        )

    async def _decide(
        self,
        fact: VmDiscovered,
        host: HostRecord,
        reported_at: float,
        request: AdoptionRequest | None,
    ) -> VmAdoptionResult:
        """Run the rules; adopt when they pass and the mode or the request says so."""
        reading = adoption_spec(fact, request.guest_os if request else None)
        reasons = list(reading.problems)
        overridden: list[str] = []
        tpm_xml: str | None = None
        if reading.spec is not None:
            decision = decide_tpm(
                reading.spec,
                rules=self._settings.guest_os_rules,
                aliases=self._settings.guest_os_aliases,
                cluster=ClusterView(
                    host.cluster,
                    await self._hosts.live_in_cluster(
                        host.cluster, self._settings.host_lost_after_s
                    ),
                ),
                overrides=request.overrides if request else Overrides(),
            )
            reasons += explain_guest_os(decision.reasons, reading.guest_os_known)
            overridden = decision.overridden
            tpm_xml = decision.tpm_xml
        if request is None and not adopts_by_itself(fact):
            reasons.append(not_by_itself_reason(fact))
        if reasons or reading.spec is None or tpm_xml is None:
            await self._records.note(DiscoveredRecord(fact, reasons, reported_at))
            return VmAdoptionResult(
                adopted=False, vm_id=fact.vm_id, name=fact.name, host=fact.host, reasons=reasons
            )
        await self._registry.register_vm(reading.spec, tpm_xml)
        await self._registry.mark_adopted(fact.vm_id, fact.host)
        epoch = await self._place(fact.vm_id, host)
        if epoch is None:
            reason = "placement: the VM was placed elsewhere meanwhile"
            return VmAdoptionResult(
                adopted=False, vm_id=fact.vm_id, name=fact.name, reasons=[reason]
            )
        await self._records.forget(fact.vm_id)
        requested_by = request.requested_by if request else None
        await self._announce(fact.vm_id, fact.host, epoch, requested_by, overridden)
        return VmAdoptionResult(
            adopted=True,
            vm_id=fact.vm_id,
            name=fact.name,
            host=fact.host,
            epoch=epoch,
            overridden=overridden,
        )

    async def _place(self, vm_id: str, host: HostRecord) -> int | None:
        """Place the VM on ``host`` under a new epoch (from nowhere); None on a conflict."""
        try:
            epoch = await self._registry.place(vm_id, host.host, expected_host=None)
        except PlacementConflictError as error:
            log.info("adoption lost a race", vm_id=vm_id, host=host.host, reason=str(error))
            return None
        await self._registry.mark_epoch_pending(vm_id, host.host, epoch)
        await self._registry.note_placed(vm_id, host.host, host.capabilities.swtpm_version)
        return epoch

    async def _announce(
        self,
        vm_id: str,
        host: str,
        epoch: int,
        requested_by: str | None,
        overridden: list[str],
    ) -> None:
        await self._gateway.publish(
            VmAdopted(
                vm_id=vm_id,
                host=host,
                epoch=epoch,
                requested_by=requested_by,
                overridden=overridden,
            ),
            vm_id,
        )
        log.info("VM adopted", vm_id=vm_id, host=host, epoch=epoch, requested_by=requested_by)
        await self._tell_epoch(vm_id, host, epoch)

    async def _tell_epoch(self, vm_id: str, host: str, epoch: int) -> None:
        result = await self._gateway.host(
            host, SetPlacementEpoch(vm_id=vm_id, epoch=epoch), SetPlacementEpochReply, vm_id
        )
        if not result.ok:
            log.warning(
                "host not told the adopted VM's epoch yet; retried on its heartbeat",
                vm_id=vm_id,
                host=host,
                reason=result.error,
            )

    async def _live_host(self, host_id: str) -> HostRecord | None:
        host = await self._hosts.host(host_id)
        if host is None or not host.alive(time.time(), self._settings.host_lost_after_s):
            return None
        return host
