"""A client of vTPM Keeper for people and automation: ask policy and the state store, watch
the events."""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import Callable, Sequence
from typing import TypeVar

from aio_pika.abc import AbstractIncomingMessage, AbstractQueue
from pydantic import SecretBytes

from keeper_shared.bus.client import BusClient
from keeper_shared.bus.node_failover import broker_user
from keeper_shared.bus.topology import EVENTS_EXCHANGE, POLICY, STATE_STORE, client_queue_name
from keeper_shared.messages.adoption import (
    AdoptVm,
    ListUnprotectedVms,
    UnprotectedVmsListed,
    UnprotectedVmView,
    VmAdoptionResult,
)
from keeper_shared.messages.commands import CommandDone
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
from keeper_shared.messages.vm_snapshot import SnapshotVm
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

    async def _ask(self, target: str, payload: Payload, subject: str) -> dict[str, str]:
        """A command answered with CommandDone: its detail, or KeeperRequestError."""
        done = await self._call(target, payload, CommandDone, subject)
        if not done.ok:
            raise KeeperRequestError(
                done.error or "refused without a reason",
                timed_out=done.detail.get("timeout") == "true",
            )
        return dict(done.detail)

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
        detail = await self.request_tpm(
            spec,
            override=override,
            override_guest_os=override_guest_os,
            allow_duplicate_name=allow_duplicate_name,
            cluster=cluster,
        )
        return str(detail["tpm_xml"])

    async def start(self, vm_id: str, host: str, *, domain_xml: str | None = None) -> int:
        """Start a VM on ``host`` with its newest state (defining ``domain_xml``, its
        manager's own domain, when given); returns the new placement epoch (:meth:`place`
        takes versions, snapshots and overrides)."""
        detail = await self.place(vm_id, host, domain_xml=domain_xml)
        return int(detail["epoch"])

    async def stop(self, vm_id: str, mode: StopMode) -> bool:
        """Stop a VM, keeping its final state; True when that state was retrieved
        (:meth:`stop_vm` returns the whole account)."""
        detail = await self.stop_vm(vm_id, mode)
        return detail.get("retrieved") == "true"

    async def request_tpm(
        self,
        spec: VmSpec,
        *,
        cluster: str = DEFAULT_CLUSTER,
        override: bool = False,
        override_guest_os: bool = False,
        allow_duplicate_name: bool = False,
    ) -> dict[str, str]:
        """Register a VM with a TPM in ``cluster``; returns the approval's detail
        (``tpm_xml``, ``guest_os_support``, ``overridden``). Raises KeeperRequestError with
        every reason when rejected (a name another VM has is one, unless
        ``allow_duplicate_name``)."""
        request = EnableTpm(
            spec=spec,
            cluster=cluster,
            override=override,
            override_guest_os=override_guest_os,
            allow_duplicate_name=allow_duplicate_name,
        )
        return await self._ask(self._policy_target, request, spec.vm_id)

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
    ) -> dict[str, str]:
        """Start a VM on ``host``; returns the detail (``epoch``, versions sent, and
        ``version_overridden`` when an older swtpm was allowed). ``domain_xml``: the VM
        manager's own domain, which policy checks, completes and keeps for later starts."""
        request = PlaceVm(
            vm_id=vm_id,
            host=host,
            override_version=override_version,
            versions=versions,
            snapshot_id=snapshot_id,
            allow_older=allow_older,
            domain_xml=domain_xml,
        )
        return await self._ask(self._policy_target, request, vm_id)

    async def stop_vm(self, vm_id: str, mode: StopMode) -> dict[str, str]:
        """Stop a VM; returns how it went (``retrieved``, ``removed``, ``trigger``,
        ``attempts``), or a ``note`` when it ran nowhere."""
        return await self._ask(self._policy_target, StopVm(vm_id=vm_id, mode=mode), vm_id)

    async def snapshot(
        self, vm_id: str, snapshot_id: str, *, memory: bool = False
    ) -> dict[str, str]:
        """Snapshot a VM (with memory: paused while its TPM state is retrieved); returns the
        detail (``mode``, the pinned version per kind, ``persisted_age_s`` for a live one).
        Restore it with :meth:`place` and ``snapshot_id``."""
        request = SnapshotVm(vm_id=vm_id, snapshot_id=snapshot_id, memory=memory)
        return await self._ask(self._policy_target, request, vm_id)

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
    ) -> dict[str, str]:
        """Have the store put stored state in place on ``host`` (a low-level step of a
        start: policy sends it after raising the epoch). Returns the prepare's detail
        (with ``tpm_secret_uuid`` when the TPM state is encrypted with a libvirt secret)."""
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
        return await self._ask(self._store_target, request, vm_id)

    async def create_snapshot(self, vm_id: str, snapshot_id: str) -> dict[StateKind, int]:
        """Pin the VM's newest versions under ``snapshot_id``; returns what was pinned."""
        detail = await self._ask(
            self._store_target, CreateSnapshot(vm_id=vm_id, snapshot_id=snapshot_id), vm_id
        )
        return _versions(detail)

    async def delete_snapshot(self, vm_id: str, snapshot_id: str) -> bool:
        """Delete a snapshot; False when there was none."""
        detail = await self._ask(
            self._store_target, DeleteSnapshot(vm_id=vm_id, snapshot_id=snapshot_id), vm_id
        )
        return detail.get("deleted") == "true"

    async def delete_state(self, vm_id: str, *, reason: str = "") -> dict[str, int]:
        """Delete a stopped VM's stored state, snapshots and data key; returns how many
        ``tpm_versions``, ``nvram_versions`` and ``snapshots`` were deleted."""
        detail = await self._ask(self._store_target, DeleteState(vm_id=vm_id, reason=reason), vm_id)
        return _counts(detail)

    async def disable_tpm(self, vm_id: str, *, reason: str = "") -> dict[str, int]:
        """Disable a stopped VM's TPM: its state is deleted (as :meth:`delete_state`) and
        its registration removed; returns what was deleted."""
        detail = await self._ask(self._policy_target, DisableTpm(vm_id=vm_id, reason=reason), vm_id)
        return _counts(detail)

    async def accept_tpm(self, vm_id: str, *, requested_by: str = "") -> dict[str, str]:
        """Make the VM's newest stored TPM its own (after a reset); the store's detail:
        ``version`` accepted, and ``reset_version`` when a reset was pending."""
        request = AcceptTpm(vm_id=vm_id, requested_by=requested_by)
        return await self._ask(self._store_target, request, vm_id)

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
        return _versions(await self._ask(self._store_target, request, target_vm_id))

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

    async def delete_template(self, template_id: str) -> dict[str, str]:
        """Delete a template and its NVRAM copy; policy's detail (``nvram_versions``)."""
        request = DeleteTemplate(template_id=template_id)
        return await self._ask(self._policy_target, request, template_id)

    async def create_vm_from_template(self, request: CreateVmFromTemplate) -> dict[str, str]:
        """Register a VM from a template through the TPM rules; policy's detail
        (``tpm_xml``, ``nvram`` = ``copied`` or ``none``)."""
        return await self._ask(self._policy_target, request, request.vm_id)

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
        detail = await self._ask(self._store_target, request, target_vm_id or "import")
        return detail["vm_id"]

    def _store_key(self) -> SealingPublicKey:
        """The key passphrases are sealed to, or a refusal to send one in clear."""
        if self._store_sealing_key is None:
            raise KeeperRequestError(
                "the store's sealing key is not configured (KEEPER_STORE_SEALING_KEY, the "
                "public key `python -m keeper_shared.sealing.keygen --public` prints): a "
                "bundle passphrase is never sent in clear"
            )
        return self._store_sealing_key


def _counts(detail: dict[str, str]) -> dict[str, int]:
    """The numeric facts of a reply's detail."""
    return {name: int(value) for name, value in detail.items() if value.isdigit()}


def _versions(detail: dict[str, str]) -> dict[StateKind, int]:
    """The per-kind versions in a store reply's detail."""
    return {kind: int(detail[kind.value]) for kind in StateKind if kind.value in detail}
