"""One host agent: its hypervisor, the state tracker and watcher, its command handlers, the
heartbeat, and what it does on each libvirt lifecycle event."""

from __future__ import annotations

import asyncio

import structlog

from keeper_host_agent.commands.placement import (
    EpochRefusedError,
    PlacementCommands,
    set_placement_epoch,
)
from keeper_host_agent.commands.revert import RevertCommands
from keeper_host_agent.commands.snapshots import SnapshotCommands
from keeper_host_agent.commands.vm_lifecycle import HostCommands
from keeper_host_agent.detect.announcer import ChangeAnnouncer
from keeper_host_agent.detect.change_watcher import ChangeWatcher
from keeper_host_agent.detect.inline_state import InlineBudget, inliner_for
from keeper_host_agent.detect.state_tracker import StateTracker
from keeper_host_agent.hook.handler import HookHandler
from keeper_host_agent.hypervisor.domain_xml import (
    DomainStateLocation,
    DomainXmlError,
    parse_domain,
)
from keeper_host_agent.hypervisor.errors import HypervisorError, TpmSecretUnreadableError
from keeper_host_agent.hypervisor.libvirt_adapter import LibvirtHypervisor
from keeper_host_agent.hypervisor.port import DomainSnapshot, Hypervisor, LifecycleEvent
from keeper_host_agent.reconcile.discovery import discovered
from keeper_host_agent.reconcile.implied_facts import DomainPresence, implied_facts
from keeper_host_agent.sealing_keys import HostSealingKeys
from keeper_host_agent.settings import HostAgentSettings
from keeper_shared.bus.client import BusClient, Route
from keeper_shared.bus.senders import only_from
from keeper_shared.messages.envelope import Payload
from keeper_shared.messages.host import HostCapabilities, HostHeartbeat
from keeper_shared.messages.releases import CURRENT_RELEASE
from keeper_shared.messages.state import FetchState, StateChanged
from keeper_shared.messages.tpm import TpmStateStranded
from keeper_shared.messages.vm import (
    PowerOffVm,
    PrepareVm,
    ShutdownVm,
    StartVm,
    StopReason,
    UndefineVm,
    VmDefined,
    VmResumed,
    VmStarted,
    VmStopped,
    VmSuspended,
    VmUndefined,
)
from keeper_shared.messages.vm_control import (
    DeleteDomainSnapshot,
    ResumeVm,
    RevertDomain,
    SetPlacementEpoch,
    SnapshotDomain,
    SuspendVm,
)
from keeper_shared.observability import metrics
from keeper_shared.runtime.background import BackgroundTasks

log = structlog.get_logger(__name__)


class HostAgent:
    """One host agent: owns its hypervisor connection, its tracker and its bus client."""

    def __init__(
        self, settings: HostAgentSettings, bus: BusClient, hypervisor: Hypervisor | None = None
    ) -> None:
        """``hypervisor`` defaults to libvirt at ``settings.libvirt_uri`` (tests pass a fake).
        The host's sealing key is made here on first start."""
        self.settings = settings
        self.sealing = HostSealingKeys.from_settings(settings)
        self.bus = bus
        self.hypervisor: Hypervisor = hypervisor or LibvirtHypervisor(settings.libvirt_uri)
        inliner = (
            inliner_for(
                bus.levels.configured,
                self.sealing.store,
                InlineBudget(settings.inline_state_max_bytes, settings.inline_blob_max_bytes),
            )
            if settings.inline_state_max_bytes > 0
            else None
        )
        self.announcer = ChangeAnnouncer(settings.host_id, self._publish_changes, inliner)
        self.tracker = StateTracker(
            window_s=settings.stability_window_s,
            announce=self.announcer.announce,
            generation_mark=settings.generation_mark_file,
        )
        self.watcher = ChangeWatcher(self.tracker, rescan_interval_s=settings.rescan_interval_s)
        self.commands = HostCommands(settings, self.hypervisor, self.tracker, self.sealing)
        self.placement = PlacementCommands(self.hypervisor, self.refresh_domain)
        self.snapshots = SnapshotCommands(self.hypervisor, settings.snapshot_dir)
        self.revert = RevertCommands(settings, self.hypervisor)
        self.hook = HookHandler(settings, bus, self.hypervisor, self.tracker, self.sealing)
        self.lifecycle_tasks = BackgroundTasks("lifecycle handling failed")
        """What each libvirt event set off (publishing its fact, re-reading the domain)."""
        self._secret_checked: dict[str, str] = {}
        """VM id -> the TPM secret already checked for it."""
        self._presence: dict[str, DomainPresence] = {}
        """Every tracked domain as last read, to tell what changed while nobody watched."""
        self._view_read = False
        """The view was read once: a later rebuild knows what the host held before."""

    async def _publish_changes(self, event: StateChanged) -> None:
        await self.bus.publish_event(event, subject=event.host)
        for change in event.changes:
            metrics.STATE_CHANGES_PUBLISHED.labels(kind=change.kind.value).inc()
        log.info(
            "state changes announced",
            count=len(event.changes),
            inline=sum(change.sealed is not None for change in event.changes),
            changed=[f"{change.vm_id}/{change.kind.value}" for change in event.changes],
        )

    async def refresh_domain(self, vm_id: str) -> None:
        """Re-read one domain from libvirt and track or untrack it."""
        snapshot = await self.hypervisor.domain(vm_id)
        self._presence.pop(vm_id, None)
        if snapshot is None:
            self.tracker.untrack(vm_id)
            self._secret_checked.pop(vm_id, None)
        else:
            try:
                location = parse_domain(
                    snapshot.xml,
                    swtpm_root=self.settings.swtpm_root,
                    nvram_dir=self.settings.nvram_dir,
                )
            except DomainXmlError as error:
                log.warning("domain ignored", vm_id=vm_id, reason=str(error))
                location = None
            if location is None:
                self.tracker.untrack(vm_id)
            else:
                self.tracker.track(location)
                self._check_tpm_secret(location)
                self._presence[vm_id] = DomainPresence(
                    name=snapshot.name,
                    placed=location.epoch > 0,
                    active=snapshot.active,
                    shutoff_reason=snapshot.shutoff_reason,
                )
        self.watcher.sync_watches()

    async def _announce_discovered(self, snapshot: DomainSnapshot) -> None:
        """Report a TPM/UEFI domain vTPM Keeper did not place, for policy to adopt."""
        fact = discovered(snapshot, host=self.settings.host_id, adoption=self.settings.adopt)
        log.info("unplaced domain reported", vm_id=fact.vm_id, name=fact.name)
        await self.bus.publish_event(fact, subject=fact.vm_id)

    async def _announce_if_unplaced(self, vm_id: str) -> None:
        presence = self._presence.get(vm_id)
        if presence is None or presence.placed:
            return
        snapshot = await self.hypervisor.domain(vm_id)
        if snapshot is not None:
            await self._announce_discovered(snapshot)

    def _check_tpm_secret(self, location: DomainStateLocation) -> None:
        """Once per domain and secret: say so when the TPM state is encrypted with a secret
        this host cannot read, since that state cannot be used anywhere else."""
        if location.tpm_secret_uuid is None:
            return
        if self._secret_checked.get(location.vm_id) != location.tpm_secret_uuid:
            self._secret_checked[location.vm_id] = location.tpm_secret_uuid
            self.lifecycle_tasks.spawn(
                self._report_unreadable_secret(location.vm_id, location.tpm_secret_uuid)
            )

    async def _report_unreadable_secret(self, vm_id: str, secret_uuid: str) -> None:
        try:
            await self.hypervisor.read_foreign_secret(vm_id, secret_uuid)
            return
        except TpmSecretUnreadableError as error:
            reason = str(error)
        except HypervisorError as error:
            # Not known either way (libvirt away): ask again when the domain is next read.
            self._secret_checked.pop(vm_id, None)
            log.warning("TPM secret not checked", vm_id=vm_id, reason=str(error))
            return
        log.warning(
            "TPM state cannot be moved: its secret is unreadable",
            vm_id=vm_id,
            tpm_secret_id=secret_uuid,
            reason=reason,
        )
        await self.bus.publish_event(
            TpmStateStranded(
                vm_id=vm_id, host=self.settings.host_id, secret_uuid=secret_uuid, reason=reason
            ),
            subject=vm_id,
        )

    async def rebuild_view(self) -> None:
        """Track every TPM/UEFI domain libvirt knows and forget those it no longer has; the
        state of each is read and re-announced when it changed. Runs at start-up and after
        each reconnect to libvirt (events that happened in between were never delivered):
        what changed meanwhile is reported as the lifecycle facts it implies, and every
        domain vTPM Keeper did not place as discovered."""
        before = dict(self._presence) if self._view_read else None
        domains = await self.hypervisor.list_domains()
        listed = {snapshot.vm_id for snapshot in domains}
        for vm_id in set(self.tracker.vms) - listed:
            self.tracker.untrack(vm_id)
            self._presence.pop(vm_id, None)
        for snapshot in domains:
            await self.refresh_domain(snapshot.vm_id)
        self.watcher.sync_watches()
        self._view_read = True
        for fact in implied_facts(before, dict(self._presence)):
            log.info("lifecycle missed", vm_id=fact.vm_id, lifecycle=fact.event)
            await self._publish_lifecycle(
                LifecycleEvent(fact.vm_id, fact.name, fact.event, fact.stop_reason), missed=True
            )
        for snapshot in domains:
            presence = self._presence.get(snapshot.vm_id)
            if presence is not None and not presence.placed:
                await self._announce_discovered(snapshot)
        log.info("view rebuilt", vms=len(self.tracker.vms), domains=len(domains))

    def on_lifecycle(self, event: LifecycleEvent) -> None:
        """Called on the asyncio loop for each libvirt event."""
        self.lifecycle_tasks.spawn(self._handle_lifecycle(event))

    async def _handle_lifecycle(self, event: LifecycleEvent) -> None:
        try:
            if event.event == "started":
                await self._stamp_epoch(event.vm_id)
            await self.refresh_domain(event.vm_id)
        except HypervisorError as error:
            log.warning("domain refresh failed", vm_id=event.vm_id, reason=str(error))
        log.info("lifecycle", vm_id=event.vm_id, lifecycle=event.event, reason=event.stop_reason)
        await self._publish_lifecycle(event, missed=False)
        if event.event != "undefined":
            try:
                await self._announce_if_unplaced(event.vm_id)
            except HypervisorError as error:
                log.warning("unplaced domain not reported", vm_id=event.vm_id, reason=str(error))

    async def _publish_lifecycle(self, event: LifecycleEvent, *, missed: bool) -> None:
        """Publish the fact of ``event``; ``missed`` when it was inferred on a rebuild."""
        common = {"vm_id": event.vm_id, "host": self.settings.host_id, "name": event.name}
        fact: Payload
        if event.event == "stopped":
            reason = event.stop_reason or StopReason.UNKNOWN
            fact = VmStopped(**common, reason=reason, missed=missed)
        else:
            fact = {
                "defined": VmDefined,
                "undefined": VmUndefined,
                "started": VmStarted,
                "suspended": VmSuspended,
                "resumed": VmResumed,
            }[event.event](**common)
        await self.bus.publish_event(fact, subject=event.vm_id)

    async def _stamp_epoch(self, vm_id: str) -> None:
        """A domain another manager started was placed here by its hook under a new epoch:
        write it into the domain now that libvirt no longer holds it for the start."""
        epoch = self.hook.epoch_to_stamp(vm_id)
        if epoch is None:
            return
        try:
            previous = await set_placement_epoch(self.hypervisor, vm_id, epoch)
        except EpochRefusedError as error:
            log.warning("placement epoch not stamped", vm_id=vm_id, reason=str(error))
            return
        log.info("placement epoch stamped after start", vm_id=vm_id, epoch=epoch, previous=previous)

    async def heartbeat_forever(self, capabilities: HostCapabilities) -> None:
        """Send a heartbeat with the inventory every interval, until cancelled."""
        while True:
            beat = HostHeartbeat(
                host=self.settings.host_id,
                interval_s=self.settings.heartbeat_interval_s,
                cluster=self.settings.cluster,
                capabilities=capabilities,
                vms=self.tracker.inventory(),
                sealing_key=self.sealing.own.public.to_text(),
                release=CURRENT_RELEASE,
            )
            try:
                await self.bus.publish_event(beat, subject=self.settings.host_id)
            except Exception as error:  # the broker may be restarting; the next beat retries
                log.warning("heartbeat not sent", reason=type(error).__name__)
            await asyncio.sleep(self.settings.heartbeat_interval_s)

    def routes(self) -> list[Route]:
        """Which command goes to which handler; only from the keeper's services."""
        routes = [
            Route(FetchState, self.commands.fetch),
            Route(PrepareVm, self.commands.prepare),
            Route(StartVm, self.commands.start),
            Route(ShutdownVm, self.commands.shutdown),
            Route(PowerOffVm, self.commands.power_off),
            Route(UndefineVm, self.commands.undefine),
            Route(SetPlacementEpoch, self.placement.set_epoch),
            Route(SuspendVm, self.snapshots.suspend),
            Route(ResumeVm, self.snapshots.resume),
            Route(SnapshotDomain, self.snapshots.snapshot),
            Route(DeleteDomainSnapshot, self.snapshots.delete_snapshot),
            Route(RevertDomain, self.revert.revert),
        ]
        return only_from(self.settings.command_senders, routes)
