"""The handlers of one policy replica: each message type to the part that decides it."""

from __future__ import annotations

import time

import structlog

from keeper_policy.adoption.adopter import Adopter
from keeper_policy.hosts.liveness import HostLiveness
from keeper_policy.hosts.registry import HostRegistry
from keeper_policy.hosts.senders import HostSenders
from keeper_policy.placement.claim import PlacementClaims
from keeper_policy.placement.migration import MigrationTracker
from keeper_policy.placement.placer import Placer
from keeper_policy.snapshot.deleter import SnapshotDeleter
from keeper_policy.snapshot.reverter import Reverter
from keeper_policy.snapshot.snapshotter import Snapshotter
from keeper_policy.stop.stopper import Stopper
from keeper_policy.storage.vm_registry import PolicyRegistry
from keeper_policy.templates.handlers import TemplateHandlers
from keeper_policy.tpm.approver import Approver
from keeper_policy.tpm.disabler import TpmDisabler
from keeper_policy.views.queries import PolicyQueries
from keeper_policy.workflows.engine import WorkflowEngine
from keeper_shared.bus.client import Delivery, Route
from keeper_shared.bus.topology import host_command_key
from keeper_shared.bus.upgrade_levels import ReceiverLevels
from keeper_shared.libtpms import StateProfile
from keeper_shared.messages.adoption import AdoptVm, VmAdoptionResult, VmDiscovered
from keeper_shared.messages.deletion import DisableTpm, StateDeleted
from keeper_shared.messages.envelope import Envelope
from keeper_shared.messages.host import HostHeartbeat
from keeper_shared.messages.host_requests import ClaimPlacement, PlacementClaimed
from keeper_shared.messages.placement import PlaceVm, StopVm
from keeper_shared.messages.replies import (
    DisableTpmReply,
    EnableTpmReply,
    PlaceVmReply,
    RevertVmReply,
    SnapshotVmReply,
    StopVmReply,
)
from keeper_shared.messages.state import StatePersisted
from keeper_shared.messages.tpm import EnableTpm, TpmStateStranded
from keeper_shared.messages.tpm_reset import ResetFoundBy, TpmReset, TpmResetCleared
from keeper_shared.messages.vm import StopReason, VmStarted, VmStopped, VmUndefined
from keeper_shared.messages.vm_snapshot import RevertVm, SnapshotVm
from keeper_shared.runtime.background import BackgroundTasks

log = structlog.get_logger(__name__)


class PolicyService:
    """Handlers of one policy replica, and its background tasks."""

    def __init__(
        self,
        *,
        registry: PolicyRegistry,
        hosts: HostRegistry,
        engine: WorkflowEngine,
        approver: Approver,
        placer: Placer,
        stopper: Stopper,
        liveness: HostLiveness,
        migrations: MigrationTracker,
        snapshots: Snapshotter,
        reverter: Reverter,
        snapshot_deleter: SnapshotDeleter,
        disabler: TpmDisabler,
        queries: PolicyQueries,
        adopter: Adopter,
        claims: PlacementClaims,
        senders: HostSenders,
        templates: TemplateHandlers,
        receiver_levels: ReceiverLevels,
    ) -> None:
        self._registry = registry
        self._hosts = hosts
        self._engine = engine
        self._approver = approver
        self._placer = placer
        self._stopper = stopper
        self._liveness = liveness
        self._migrations = migrations
        self._snapshots = snapshots
        self._reverter = reverter
        self._snapshot_deleter = snapshot_deleter
        self._disabler = disabler
        self._queries = queries
        self._adopter = adopter
        self._claims = claims
        self._senders = senders
        self._templates = templates
        self._receiver_levels = receiver_levels
        self._background = BackgroundTasks("background task failed")

    def event_routes(self) -> list[Route]:
        """Routes of the policy events queue; a host's events only from that host."""
        from_host = self._senders.only_from_host
        return [
            Route(HostHeartbeat, from_host(self.on_heartbeat)),
            Route(StatePersisted, self.on_persisted),
            Route(StateDeleted, self.on_state_deleted),
            Route(VmStopped, from_host(self.on_vm_stopped)),
            Route(VmStarted, from_host(self.on_vm_started)),
            Route(TpmStateStranded, from_host(self.on_tpm_state_stranded)),
            Route(TpmReset, self.on_tpm_reset),
            Route(TpmResetCleared, self.on_tpm_reset_cleared),
            Route(VmDiscovered, from_host(self.on_vm_discovered)),
            Route(VmUndefined, from_host(self.on_vm_undefined)),
        ]

    def command_routes(self) -> list[Route]:
        """Routes of the policy commands queue."""
        return [
            Route(EnableTpm, self.on_enable_tpm),
            Route(DisableTpm, self.on_disable_tpm),
            Route(PlaceVm, self.on_place),
            Route(StopVm, self.on_stop),
            Route(SnapshotVm, self.on_snapshot),
            Route(RevertVm, self.on_revert),
            *self._snapshot_deleter.command_routes(),
            Route(AdoptVm, self.on_adopt),
            *self._queries.command_routes(),
            *self._templates.command_routes(),
        ]

    def host_request_routes(self) -> list[Route]:
        """Routes of the policy host-requests queue (what a host may ask for itself)."""
        return [Route(ClaimPlacement, self.on_claim)]

    def start_background(self) -> None:
        """Loss detection and the workflow sweep, until :meth:`close`."""
        self._background.spawn(self._liveness.check_forever())
        self._background.spawn(self._engine.sweep_forever())

    async def close(self) -> None:
        """Stop background work; workflows in progress are left to another replica."""
        await self._background.cancel_all()
        await self._engine.close()

    async def on_enable_tpm(
        self, envelope: Envelope[EnableTpm], delivery: Delivery
    ) -> EnableTpmReply:
        """Approve or reject a TPM; an approval registers the VM."""
        return await self._approver.enable(envelope, delivery.user_id)

    async def on_disable_tpm(
        self, envelope: Envelope[DisableTpm], delivery: Delivery
    ) -> DisableTpmReply:
        """Delete a stopped VM's stored state and its registration."""
        return await self._disabler.disable(envelope.data, delivery.user_id)

    async def on_place(self, envelope: Envelope[PlaceVm], delivery: Delivery) -> PlaceVmReply:
        """New epoch, state put in place on the host by the store, then start."""
        return await self._placer.place(envelope.data)

    async def on_claim(
        self, envelope: Envelope[ClaimPlacement], delivery: Delivery
    ) -> PlacementClaimed:
        """A VM manager is starting the VM on the requesting host: place it there."""
        return await self._claims.claim(envelope.data, delivery.user_id)

    async def on_stop(self, envelope: Envelope[StopVm], delivery: Delivery) -> StopVmReply:
        """Stop a VM keeping its final state, or join the stop already running."""
        return await self._stopper.stop(envelope.data)

    async def on_snapshot(
        self, envelope: Envelope[SnapshotVm], delivery: Delivery
    ) -> SnapshotVmReply:
        """Snapshot a VM: a pin of its stored state, or (with memory) pause, retrieve, pin,
        libvirt snapshot, resume."""
        return await self._snapshots.snapshot(envelope.data)

    async def on_revert(self, envelope: Envelope[RevertVm], delivery: Delivery) -> RevertVmReply:
        """Go back to a snapshot with memory: power off when running, restore the pinned
        TPM and NVRAM, revert the domain on the snapshot's host."""
        return await self._reverter.revert(envelope.data)

    async def on_vm_stopped(self, envelope: Envelope[VmStopped], delivery: Delivery) -> None:
        """A domain stopped without a ``vm.stop``: a migration moves the placement, any
        other stop is retrieved and undefined."""
        event = envelope.data
        if event.reason is StopReason.MIGRATED:
            await self._migrations.source_left(event)
            return
        await self._stopper.stopped_on_its_own(event, envelope.time.timestamp())

    async def on_vm_started(self, envelope: Envelope[VmStarted], delivery: Delivery) -> None:
        """A domain started: on a host other than its placement, a migration's destination;
        an adopted VM that runs nowhere, its manager starting it again."""
        await self._migrations.maybe_arrived(envelope.data)
        await self._adopter.on_started(envelope.data)

    async def on_vm_discovered(self, envelope: Envelope[VmDiscovered], delivery: Delivery) -> None:
        """A host reports a TPM/UEFI domain vTPM Keeper did not place: adopt it or record
        why not."""
        await self._adopter.on_discovered(envelope.data, envelope.time.timestamp())

    async def on_vm_undefined(self, envelope: Envelope[VmUndefined], delivery: Delivery) -> None:
        """A domain is gone from its host: a reported one is no longer there to adopt."""
        await self._adopter.on_undefined(envelope.data)

    async def on_adopt(self, envelope: Envelope[AdoptVm], delivery: Delivery) -> VmAdoptionResult:
        """Adopt a reported domain on request, whatever its host's mode, through the rules."""
        return await self._adopter.adopt(envelope.data, delivery.user_id or envelope.source)

    async def on_tpm_state_stranded(
        self, envelope: Envelope[TpmStateStranded], delivery: Delivery
    ) -> None:
        """Mark a VM whose encrypted TPM state its host cannot move (the secret is private
        and not the keeper's), so status says so; only its placement host is heard."""
        event = envelope.data
        placement = await self._registry.placement(event.vm_id)
        if placement.host != event.host:
            return
        if await self._registry.mark_stranded(event.vm_id, event.host, event.reason):
            log.warning(
                "VM's TPM state cannot be moved: its secret is unreadable",
                vm_id=event.vm_id,
                host=event.host,
                tpm_secret_id=event.secret_uuid,
            )

    async def on_tpm_reset(self, envelope: Envelope[TpmReset], delivery: Delivery) -> None:
        """Flag a VM whose stored TPM was replaced unasked, so status says so until the new
        TPM is accepted or the VM's own is back (the store decides what is restored)."""
        event = envelope.data
        if event.found_by is ResetFoundBy.PERSIST:
            text = (
                f"v{event.version} is another TPM than the VM's own (v"
                f"{event.previous_good_version}, restored next): `keeper vm accept-tpm` "
                "keeps the new one"
            )
        else:
            text = (
                f"the scrubber found a new endorsement key in v{event.version} (v"
                f"{event.previous_good_version} has the old one)"
            )
        if await self._registry.flag_tpm_reset(event.vm_id, event.version, text):
            log.warning(
                "VM's TPM was replaced unasked",
                vm_id=event.vm_id,
                version=event.version,
                previous_good_version=event.previous_good_version,
                found_by=event.found_by.value,
            )

    async def on_tpm_reset_cleared(
        self, envelope: Envelope[TpmResetCleared], delivery: Delivery
    ) -> None:
        """A VM's TPM reset is over (accepted, its own TPM back, or a restore chose)."""
        event = envelope.data
        if await self._registry.clear_tpm_reset(event.vm_id, event.version):
            log.info("VM's TPM reset is over", vm_id=event.vm_id, how=event.how.value)

    async def on_heartbeat(self, envelope: Envelope[HostHeartbeat], delivery: Delivery) -> None:
        """Remember the host as alive; a returning host cleans up; pending epochs settle."""
        beat = envelope.data
        # Believed: only_from_host let through only the host's own broker user.
        self._receiver_levels.learn(host_command_key(beat.host), beat.release)
        outcome = await self._hosts.note_heartbeat(beat, time.time())
        await self._liveness.on_heartbeat(beat, outcome.lost_at if outcome.returned else None)
        await self._migrations.on_heartbeat(beat)
        await self._adopter.on_heartbeat(beat)

    async def on_state_deleted(self, envelope: Envelope[StateDeleted], delivery: Delivery) -> None:
        """The store deleted a VM's state: its recovery point, and the snapshots with memory
        whose pins went with it (their memory files deleted on their hosts), are gone."""
        await self._registry.forget_versions(envelope.data.vm_id)
        await self._snapshot_deleter.forget_vm(envelope.data.vm_id)

    async def on_persisted(self, envelope: Envelope[StatePersisted], delivery: Delivery) -> None:
        """Track the recovery point of each VM."""
        event = envelope.data
        profile = (
            None
            if event.tpm_profile is None or event.state_format_level is None
            else StateProfile(event.tpm_profile, event.state_format_level)
        )
        await self._registry.note_persisted(
            event.vm_id, event.kind, event.version, envelope.time.timestamp(), profile
        )
