"""A client of vTPM Keeper for people and automation: ask policy and the state store, watch
the events."""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import Callable, Sequence
from typing import Protocol, TypeVar

from aio_pika.abc import AbstractIncomingMessage, AbstractQueue
from pydantic import SecretBytes

from keeper_shared.bus.client import BusClient, ReceiverCannotReadError
from keeper_shared.bus.node_failover import broker_user
from keeper_shared.bus.topology import EVENTS_EXCHANGE, POLICY, STATE_STORE, client_queue_name
from keeper_shared.messages.adoption import (
    AdoptVm,
    ListUnprotectedVms,
    UnprotectedVmsListed,
    UnprotectedVmView,
    VmAdoptionResult,
)
from keeper_shared.messages.commands import ReplyT
from keeper_shared.messages.deletion import DeleteState, DisableTpm
from keeper_shared.messages.endorsement import EndorsementKeyRead, ReadEndorsementKey
from keeper_shared.messages.envelope import Envelope, MessageError, Payload, decode, peek_type
from keeper_shared.messages.placement import PlaceVm, StopMode, StopVm
from keeper_shared.messages.queries import (
    MAX_DESCRIBED_VMS,
    DescribeStoredState,
    HostsListed,
    ListHosts,
    ListVms,
    StoredStateDescribed,
    StoredVmState,
    VmsListed,
    VmView,
)
from keeper_shared.messages.replies import (
    AcceptTpmReply,
    CloneVmReply,
    CreateSnapshotReply,
    CreateVmFromTemplateReply,
    DeleteSnapshotReply,
    DeleteStateReply,
    DeleteTemplateReply,
    DeleteVmSnapshotReply,
    DisableTpmReply,
    EnableTpmReply,
    ImportStateReply,
    PlaceVmReply,
    RestoreStateReply,
    RevertVmReply,
    SnapshotVmReply,
    StopVmReply,
)
from keeper_shared.messages.snapshot import (
    CreateSnapshot,
    DeleteSnapshot,
    ListSnapshots,
    SnapshotInfo,
    SnapshotList,
)
from keeper_shared.messages.state import ListStateHistory, RestoreState, StateHistory
from keeper_shared.messages.template import (
    CreateTemplate,
    CreateVmFromTemplate,
    DeleteTemplate,
    ListTemplates,
    TemplateCreated,
    TemplatesListed,
    TemplateView,
)
from keeper_shared.messages.tpm import DEFAULT_CLUSTER, EnableTpm, VmSpec
from keeper_shared.messages.tpm_reset import AcceptTpm
from keeper_shared.messages.transfer import (
    CloneTpm,
    CloneVm,
    ExportState,
    ImportState,
    StateExported,
)
from keeper_shared.messages.types import HOST_ID_PATTERN, StateKind
from keeper_shared.messages.vm_snapshot import DeleteVmSnapshot, RevertVm, SnapshotVm
from keeper_shared.sealing.keys import SealingPublicKey
from keeper_shared.sealing.passphrases import export_binding, import_binding, seal_passphrase

E = TypeVar("E", bound=Payload)


class KeeperRequestError(RuntimeError):
    """Policy or the store refused or could not carry out a request; the message says why."""

    def __init__(self, message: str, *, timed_out: bool = False) -> None:
        super().__init__(message)
        self.timed_out = timed_out
        """The service gave up waiting for a host or the store (``timeout`` in its reply):
        that one may yet act on what it was sent."""


class EventWatch:
    """Events seen since the watch began, to wait for one that matches."""

    def __init__(self) -> None:
        self._bodies: list[bytes] = []
        self._arrived = asyncio.Condition()

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        async with self._arrived:
            self._bodies.append(message.body)
            self._arrived.notify_all()

    def matching(
        self, event_type: type[E], matches: Callable[[E], bool] = lambda _event: True
    ) -> list[Envelope[E]]:
        """Every event of ``event_type`` seen so far that matches, oldest first."""
        found = []
        for body in self._bodies:
            try:
                if peek_type(body) != event_type.message_type:
                    continue
                envelope = decode(body, event_type)
            except MessageError:
                continue
            if matches(envelope.data):
                found.append(envelope)
        return found

    async def wait_for(
        self, event_type: type[E], matches: Callable[[E], bool], timeout_s: float
    ) -> Envelope[E]:
        """The first event of ``event_type`` (seen before or after the call) that matches."""
        seen = 0

        def find() -> Envelope[E] | None:
            nonlocal seen
            for body in self._bodies[seen:]:
                seen += 1
                try:
                    if peek_type(body) != event_type.message_type:
                        continue
                    envelope = decode(body, event_type)
                except MessageError:
                    continue
                if matches(envelope.data):
                    return envelope
            return None

        async with asyncio.timeout(timeout_s), self._arrived:
            while (found := find()) is None:
                await self._arrived.wait()
            return found


def client_origin(amqp_url: str | Sequence[str]) -> str:
    """The origin a client's queues are named after: its broker user, whose permissions
    allow ``keeper.reply.<user>.*`` and ``keeper.client.<user>.*`` (see the integrator users
    in ``docs/integrating.md``); ``client`` for a user whose name cannot be one."""
    user = broker_user([amqp_url] if isinstance(amqp_url, str) else list(amqp_url))
    return user if re.fullmatch(HOST_ID_PATTERN, user) else "client"


class ClientSettings(Protocol):
    """What the CLI's and the API's settings both say about their requests."""

    @property
    def timeout_s(self) -> float: ...
    @property
    def store_target(self) -> str: ...
    @property
    def policy_target(self) -> str: ...
    @property
    def store_sealing_key(self) -> str | None: ...


class KeeperClient:
    """Requests to policy and the state store, and a view of the events."""

    def __init__(
        self,
        bus: BusClient,
        *,
        request_timeout_s: float,
        store_target: str = STATE_STORE,
        policy_target: str = POLICY,
        store_sealing_key: SealingPublicKey | None = None,
    ) -> None:
        """``store_sealing_key``: the store's public key (pinned in configuration), which
        export and import passphrases are sealed to; without it they are not sent."""
        self._bus = bus
        self._store_sealing_key = store_sealing_key
        self._timeout = request_timeout_s
        # The services' command routing keys; only tests point them at private services.
        self._store_target = store_target
        self._policy_target = policy_target
        self._watch_queue: AbstractQueue | None = None

    @classmethod
    def configured(cls, bus: BusClient, settings: ClientSettings) -> KeeperClient:
        """A client on ``bus`` as ``settings`` say (the store's key pinned there, if any)."""
        pinned = settings.store_sealing_key
        return cls(
            bus,
            request_timeout_s=settings.timeout_s,
            store_target=settings.store_target,
            policy_target=settings.policy_target,
            store_sealing_key=SealingPublicKey.from_text(pinned) if pinned else None,
        )

    @classmethod
    async def connect(
        cls,
        amqp_url: str | Sequence[str],
        *,
        name: str,
        request_timeout_s: float = 120.0,
        store_sealing_key: SealingPublicKey | None = None,
    ) -> KeeperClient:
        """Connect as a client named ``name`` (to one broker URL, or a cluster's nodes)."""
        bus = await BusClient.connect(
            amqp_url,
            source=f"client/{name}",
            origin=client_origin(amqp_url),
            declare_exchanges=False,
        )
        return cls(bus, request_timeout_s=request_timeout_s, store_sealing_key=store_sealing_key)

    async def close(self) -> None:
        """Disconnect."""
        await self._bus.close()

    async def watch_events(self, *patterns: str) -> EventWatch:
        """Start collecting events whose routing key matches any of ``patterns``."""
        watch = EventWatch()
        channel = await self._bus.connection.channel()
        queue = await channel.declare_queue(
            client_queue_name(self._bus.origin, f"watch-{uuid.uuid4().hex[:12]}"),
            exclusive=True,
            auto_delete=True,
        )
        for pattern in patterns:
            await queue.bind(EVENTS_EXCHANGE, routing_key=pattern)
        await queue.consume(watch.on_message, no_ack=True)
        return watch

    async def _call(self, target: str, payload: Payload, reply_type: type[E], subject: str) -> E:
        reply = await self._bus.call(
            target, payload, reply_type, subject=subject, timeout_s=self._timeout
        )
        return reply.data

    async def _ask(
        self, target: str, payload: Payload, reply_type: type[ReplyT], subject: str
    ) -> ReplyT:
        """A command that is carried out or refused: its reply when done, else
        KeeperRequestError with the reason."""
        done = await self._call(target, payload, reply_type, subject)
        if not done.ok:
            raise KeeperRequestError(
                done.error or "refused without a reason", timed_out=done.timed_out
            )
        return done

    async def list_vms(self, reference: str | None = None) -> list[VmView]:
        """Every registered VM as policy keeps it, or those ``reference`` (a VM id or a
        domain name) names; by name, then id."""
        reply = await self._call(
            self._policy_target, ListVms(vm=reference), VmsListed, reference or "vms"
        )
        return reply.vms

    async def list_hosts(self) -> HostsListed:
        """Every host policy heard from, with its liveness by policy's rule."""
        return await self._call(self._policy_target, ListHosts(), HostsListed, "hosts")

    async def list_unprotected(self) -> list[UnprotectedVmView]:
        """The TPM/UEFI domains hosts reported that vTPM Keeper does not protect, with why."""
        reply = await self._call(
            self._policy_target, ListUnprotectedVms(), UnprotectedVmsListed, "unprotected"
        )
        return reply.vms

    async def adopt(self, request: AdoptVm) -> VmAdoptionResult:
        """Ask policy to adopt a reported domain; the reply says whether, or why not."""
        return await self._call(self._policy_target, request, VmAdoptionResult, request.vm)

    async def describe_stored_state(self, vm_ids: Sequence[str]) -> list[StoredVmState]:
        """What the store holds for each of ``vm_ids`` (newest version per kind), in order;
        asked in batches the message allows."""
        found: list[StoredVmState] = []
        for start in range(0, len(vm_ids), MAX_DESCRIBED_VMS):
            batch = list(vm_ids[start : start + MAX_DESCRIBED_VMS])
            request = DescribeStoredState(vm_ids=batch)
            reply = await self._call(self._store_target, request, StoredStateDescribed, batch[0])
            found.extend(reply.vms)
        return found

    async def enable_tpm(
        self,
        spec: VmSpec,
        *,
        override: bool = False,
        override_guest_os: bool = False,
        allow_duplicate_name: bool = False,
        cluster: str = DEFAULT_CLUSTER,
    ) -> str:
        """Register a VM with a TPM for ``cluster``'s hosts; returns the approved `<tpm>`
        element (:meth:`request_tpm` returns the whole approval)."""
        approval = await self.request_tpm(
            spec,
            override=override,
            override_guest_os=override_guest_os,
            allow_duplicate_name=allow_duplicate_name,
            cluster=cluster,
        )
        if approval.tpm_xml is None:
            raise KeeperRequestError("policy approved without a <tpm> element")
        return approval.tpm_xml

    async def start(self, vm_id: str, host: str, *, domain_xml: str | None = None) -> int:
        """Start a VM on ``host`` with its newest state (defining ``domain_xml``, its
        manager's own domain, when given); returns the new placement epoch (:meth:`place`
        takes versions, snapshots and overrides)."""
        placed = await self.place(vm_id, host, domain_xml=domain_xml)
        if placed.epoch is None:
            raise KeeperRequestError("policy placed the VM without naming its epoch")
        return placed.epoch

    async def stop(self, vm_id: str, mode: StopMode) -> bool:
        """Stop a VM, keeping its final state; True when that state was retrieved
        (:meth:`stop_vm` returns the whole account)."""
        return (await self.stop_vm(vm_id, mode)).retrieved

    async def request_tpm(
        self,
        spec: VmSpec,
        *,
        cluster: str = DEFAULT_CLUSTER,
        override: bool = False,
        override_guest_os: bool = False,
        allow_duplicate_name: bool = False,
    ) -> EnableTpmReply:
        """Register a VM with a TPM in ``cluster``; returns the approval (``tpm_xml``,
        ``guest_os_support``, ``overridden``). Raises KeeperRequestError with
        every reason when rejected (a name another VM has is one, unless
        ``allow_duplicate_name``)."""
        request = EnableTpm(
            spec=spec,
            cluster=cluster,
            override=override,
            override_guest_os=override_guest_os,
            allow_duplicate_name=allow_duplicate_name,
        )
        return await self._ask(self._policy_target, request, EnableTpmReply, spec.vm_id)

    async def place(
        self,
        vm_id: str,
        host: str,
        *,
        override_version: bool = False,
        versions: dict[StateKind, int] | None = None,
        snapshot_id: str | None = None,
        allow_older: bool = False,
        domain_xml: str | None = None,
    ) -> PlaceVmReply:
        """Start a VM on ``host``; returns how (``epoch``, the versions it started with,
        ``version_overridden`` when an older swtpm was allowed, ``already_placed`` for a
        repeat). ``domain_xml``: the VM manager's own domain, which policy checks, completes
        and keeps for later starts."""
        request = PlaceVm(
            vm_id=vm_id,
            host=host,
            override_version=override_version,
            versions=versions,
            snapshot_id=snapshot_id,
            allow_older=allow_older,
            domain_xml=domain_xml,
        )
        return await self._ask(self._policy_target, request, PlaceVmReply, vm_id)

    async def stop_vm(self, vm_id: str, mode: StopMode) -> StopVmReply:
        """Stop a VM; returns how it went (``retrieved``, ``removed``, ``trigger``,
        ``attempts``; ``was_running`` false when it ran nowhere)."""
        request = StopVm(vm_id=vm_id, mode=mode)
        return await self._ask(self._policy_target, request, StopVmReply, vm_id)

    async def snapshot(
        self, vm_id: str, snapshot_id: str, *, memory: bool = False
    ) -> SnapshotVmReply:
        """Snapshot a VM (with memory: paused while its TPM state is retrieved); returns
        ``mode``, the pinned version per kind, ``persisted_age_s`` for a live one. Restore
        it with :meth:`place` and ``snapshot_id``."""
        request = SnapshotVm(vm_id=vm_id, snapshot_id=snapshot_id, memory=memory)
        return await self._ask(self._policy_target, request, SnapshotVmReply, vm_id)

    async def revert(self, vm_id: str, snapshot_id: str) -> RevertVmReply:
        """Go back to a snapshot with memory (a running VM is powered off first, its final
        state kept); returns where and under which epoch it runs, and the versions put
        back."""
        request = RevertVm(vm_id=vm_id, snapshot_id=snapshot_id)
        return await self._ask(self._policy_target, request, RevertVmReply, vm_id)

    async def endorsement_key(self, vm_id: str) -> EndorsementKeyRead:
        """The EK of the VM's newest stored TPM (public key, certificate), read by the store
        from a throwaway swtpm; KeeperRequestError when there is none to show."""
        reply = await self._call(
            self._store_target, ReadEndorsementKey(vm_id=vm_id), EndorsementKeyRead, vm_id
        )
        if not reply.ok:
            raise KeeperRequestError(reply.error or "no endorsement key")
        return reply

    async def state_history(self, vm_id: str) -> StateHistory:
        """Every kept version of the VM's TPM and NVRAM, with pins and scrubber flags."""
        return await self._call(
            self._store_target, ListStateHistory(vm_id=vm_id), StateHistory, vm_id
        )

    async def restore_state(
        self,
        vm_id: str,
        *,
        name: str,
        host: str,
        epoch: int,
        versions: dict[StateKind, int] | None = None,
        snapshot_id: str | None = None,
        allow_older: bool = False,
        encrypt_tpm_state: bool = False,
    ) -> RestoreStateReply:
        """Have the store put stored state in place on ``host`` (a low-level step of a
        start: policy sends it after raising the epoch). Returns the versions sent (and
        ``tpm_secret_uuid`` when the TPM state is encrypted with a libvirt secret)."""
        request = RestoreState(
            vm_id=vm_id,
            name=name,
            host=host,
            epoch=epoch,
            versions=versions,
            snapshot_id=snapshot_id,
            allow_older=allow_older,
            encrypt_tpm_state=encrypt_tpm_state,
        )
        return await self._ask(self._store_target, request, RestoreStateReply, vm_id)

    async def create_snapshot(self, vm_id: str, snapshot_id: str) -> dict[StateKind, int]:
        """Pin the VM's newest versions under ``snapshot_id``; returns what was pinned."""
        request = CreateSnapshot(vm_id=vm_id, snapshot_id=snapshot_id)
        pinned = await self._ask(self._store_target, request, CreateSnapshotReply, vm_id)
        return pinned.versions

    async def delete_snapshot(self, vm_id: str, snapshot_id: str) -> DeleteVmSnapshotReply:
        """Delete a snapshot through policy, its memory file on its host included; the
        reply's ``deleted`` is False when there was none. Policy of the previous release
        does not know the command: then only the store's pin is deleted, as that release
        did (the reply names no host)."""
        request = DeleteVmSnapshot(vm_id=vm_id, snapshot_id=snapshot_id)
        try:
            return await self._ask(self._policy_target, request, DeleteVmSnapshotReply, vm_id)
        except ReceiverCannotReadError:
            deleted = await self.unpin_snapshot(vm_id, snapshot_id)
            return DeleteVmSnapshotReply(ok=True, deleted=deleted)

    async def unpin_snapshot(self, vm_id: str, snapshot_id: str) -> bool:
        """Have the store drop a snapshot's pin (a low-level step of :meth:`delete_snapshot`,
        which deletes a snapshot's memory too); False when there was none."""
        request = DeleteSnapshot(vm_id=vm_id, snapshot_id=snapshot_id)
        reply = await self._ask(self._store_target, request, DeleteSnapshotReply, vm_id)
        return reply.deleted

    async def delete_state(self, vm_id: str, *, reason: str = "") -> DeleteStateReply:
        """Delete a stopped VM's stored state, snapshots and data key; returns how many
        versions of each kind and how many snapshots were deleted."""
        request = DeleteState(vm_id=vm_id, reason=reason)
        return await self._ask(self._store_target, request, DeleteStateReply, vm_id)

    async def disable_tpm(self, vm_id: str, *, reason: str = "") -> DisableTpmReply:
        """Disable a stopped VM's TPM: its state is deleted (as :meth:`delete_state`) and
        its registration removed; returns what was deleted."""
        request = DisableTpm(vm_id=vm_id, reason=reason)
        return await self._ask(self._policy_target, request, DisableTpmReply, vm_id)

    async def accept_tpm(self, vm_id: str, *, requested_by: str = "") -> AcceptTpmReply:
        """Make the VM's newest stored TPM its own (after a reset); returns the ``version``
        accepted, and ``reset_version`` when a reset was pending."""
        request = AcceptTpm(vm_id=vm_id, requested_by=requested_by)
        return await self._ask(self._store_target, request, AcceptTpmReply, vm_id)

    async def list_snapshots(self, vm_id: str) -> list[SnapshotInfo]:
        """The VM's snapshots, oldest first."""
        reply = await self._call(
            self._store_target, ListSnapshots(vm_id=vm_id), SnapshotList, vm_id
        )
        return reply.snapshots

    async def clone_vm(
        self, source_vm_id: str, target_vm_id: str, tpm: CloneTpm
    ) -> dict[StateKind, int]:
        """Give a VM without state a copy of another's (same TPM, or a fresh one)."""
        request = CloneVm(source_vm_id=source_vm_id, target_vm_id=target_vm_id, tpm=tpm)
        cloned = await self._ask(self._store_target, request, CloneVmReply, target_vm_id)
        return cloned.versions

    async def create_template(self, request: CreateTemplate) -> TemplateView:
        """Create a template from a VM or a spec (see :class:`CreateTemplate`)."""
        reply = await self._call(self._policy_target, request, TemplateCreated, request.name)
        if reply.template is None:
            raise KeeperRequestError(reply.error or "refused without a reason")
        return reply.template

    async def list_templates(self) -> list[TemplateView]:
        """Every template, by name."""
        reply = await self._call(self._policy_target, ListTemplates(), TemplatesListed, "templates")
        return reply.templates

    async def delete_template(self, template_id: str) -> DeleteTemplateReply:
        """Delete a template and its NVRAM copy; returns how many NVRAM versions went."""
        request = DeleteTemplate(template_id=template_id)
        return await self._ask(self._policy_target, request, DeleteTemplateReply, template_id)

    async def create_vm_from_template(
        self, request: CreateVmFromTemplate
    ) -> CreateVmFromTemplateReply:
        """Register a VM from a template through the TPM rules; returns the approval
        (``tpm_xml``) and whether the template's NVRAM was copied."""
        return await self._ask(
            self._policy_target, request, CreateVmFromTemplateReply, request.vm_id
        )

    async def export_state(self, vm_id: str, passphrase: str) -> bytes:
        """The VM's newest state as a bundle file's bytes (the store's bundle format)."""
        sealed = seal_passphrase(passphrase, self._store_key(), export_binding(vm_id))
        request = ExportState(vm_id=vm_id, passphrase=sealed)
        reply = await self._call(self._store_target, request, StateExported, vm_id)
        if reply.bundle is None:
            raise KeeperRequestError(reply.error or "export failed without a reason")
        return reply.bundle.get_secret_value()

    async def import_state(
        self, bundle: bytes, passphrase: str, *, target_vm_id: str | None = None
    ) -> str:
        """Verify and store a bundle for a VM without state; returns that VM's id."""
        binding = import_binding(bundle, target_vm_id)
        request = ImportState(
            bundle=SecretBytes(bundle),
            passphrase=seal_passphrase(passphrase, self._store_key(), binding),
            target_vm_id=target_vm_id,
        )
        subject = target_vm_id or "import"
        imported = await self._ask(self._store_target, request, ImportStateReply, subject)
        if imported.vm_id is None:
            raise KeeperRequestError("the store imported the bundle without naming the VM")
        return imported.vm_id

    def _store_key(self) -> SealingPublicKey:
        """The key passphrases are sealed to, or a refusal to send one in clear."""
        if self._store_sealing_key is None:
            raise KeeperRequestError(
                "the store's sealing key is not configured (KEEPER_STORE_SEALING_KEY, the "
                "public key `python -m keeper_shared.sealing.keygen --public` prints): a "
                "bundle passphrase is never sent in clear"
            )
        return self._store_sealing_key
