"""The store's behaviour: take or pull what changed, verify, encrypt, persist fenced, announce.

A ``state.changed`` event is acknowledged only after the durable write (or after deciding
there is nothing to write), so a replica killed mid-way means redelivery to another one, and
the fenced write makes the second attempt a no-op when the first had landed. State the host
sent inline is written as it came (see handlers.inline_state); the rest is pulled, and
pulls for one host are coalesced into batched fetches (see handlers.pull_batcher).

The changes of the events that arrive together are checked and written together, whichever
host sent them (see ``StateService._take_changes``): a fleet is many hosts announcing a
change or two each, and handling each event on its own paid a read of the heads, the
opening of a write batch and its bookkeeping per event, where one host announcing a
hundred changes paid them once.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Mapping
from dataclasses import dataclass

import structlog

from keeper_shared.bus.client import BusClient, CallError, CallTimeoutError, Delivery, Route
from keeper_shared.bus.topology import host_command_key
from keeper_shared.messages.envelope import Envelope, MessageError
from keeper_shared.messages.host import HostHeartbeat
from keeper_shared.messages.host_loss import HostLost
from keeper_shared.messages.replies import PrepareVmReply, RestoreStateReply, RetrieveStateReply
from keeper_shared.messages.state import (
    FetchedVmState,
    FetchState,
    RestoreState,
    RetrieveState,
    StateChange,
    StateChanged,
    StateFetched,
    StatePersisted,
    VersionOrigin,
)
from keeper_shared.messages.types import StateBlob, StateKind
from keeper_shared.messages.vm import PrepareVm
from keeper_shared.observability import metrics
from keeper_shared.sealing.construction import SealingError
from keeper_shared.sealing.keys import SealingPublicKey
from keeper_shared.sealing.state_blobs import seal_state_blob, seal_tpm_secret
from keeper_state_store.crypto.bus_sealing import HostKeyUnknownError, StoreBusSealing
from keeper_state_store.crypto.encryption import DecryptionError
from keeper_state_store.crypto.sealing import BlobSealer
from keeper_state_store.crypto.tpm_secrets import TpmSecretVault
from keeper_state_store.handlers.admission import ChangeAdmission
from keeper_state_store.handlers.coalescer import Coalescer
from keeper_state_store.handlers.fetched_writer import FetchedStateWriter
from keeper_state_store.handlers.inline_state import InlineStateIntake
from keeper_state_store.handlers.pull_batcher import PullBatcher
from keeper_state_store.handlers.tpm_reset import TpmResetAnnouncer
from keeper_state_store.settings import StateStoreSettings
from keeper_state_store.storage.repository import Placement, StateRepository, StoredHead
from keeper_state_store.storage.snapshots import SnapshotStore
from keeper_state_store.storage.version_reader import (
    VersionNotKeptError,
    VersionReader,
    VersionUnreadableError,
)
from keeper_state_store.transfer.restore_plan import RestoreRefusedError, plan_restore

log = structlog.get_logger(__name__)


class RetrievalError(Exception):
    """The host's newest state of a VM could not be stored; the reason is safe to show."""


@dataclass(frozen=True)
class _Announced:
    """One change of a ``state.changed`` event, with what its checks need of the event."""

    change: StateChange
    host: str
    delivery: Delivery


class _Taken(enum.Enum):
    DONE = "done"
    """Stored, already stored, superseded or refused: nothing more to do for it."""
    PULL = "pull"
    """Announced by its hash alone, or its inline blob did not open: to be fetched."""


_Outcome = _Taken | BaseException
"""What taking one announced change came to (an exception: it failed, and its event is
redelivered)."""


class _Check(enum.Enum):
    STORE = "store"
    SKIP = "skip"
    ANNOUNCE_AGAIN = "announce again"
    """Already stored, and its event redelivered: its ``state.persisted`` may be lost."""


class StateService:
    """Handlers of one state-store replica: events from hosts, retrieve and restore."""

    def __init__(
        self,
        settings: StateStoreSettings,
        repository: StateRepository,
        bus: BusClient,
        sealing: StoreBusSealing,
    ) -> None:
        self._settings = settings
        self.sealing = sealing
        """The store's sealing keys and the hosts' (host requests seal with them too)."""
        self._repository = repository
        self._bus = bus
        self._reader = VersionReader(repository.redis, repository.keys)
        self._secrets = TpmSecretVault(repository)
        self._snapshots = SnapshotStore(repository.redis, repository.replicas)
        self._resets = TpmResetAnnouncer(repository.trust, bus)
        self._writer = FetchedStateWriter(
            repository, BlobSealer(repository), self._secrets, bus, self._resets
        )
        self._inline = InlineStateIntake(sealing.own)
        self._admission = ChangeAdmission(settings.changes_in_flight)
        # Two batches of changes may be on their way at once (one written while the next is
        # checked); both fit in the admission gate. A change of a VM and kind already in
        # the batch being formed waits for the next one, so a batch writes each once.
        self._changes: Coalescer[_Announced, _Outcome] = Coalescer(
            self._take_changes,
            lambda announced: (announced.change.vm_id, announced.change.kind),
            max_items=max(1, settings.changes_in_flight // 2),
            max_in_flight=2,
        )
        self._batcher = PullBatcher(
            self._pull_batch,
            window_s=settings.pull_batch_window_s,
            max_vms=settings.pull_batch_max_vms,
            max_in_flight=settings.pull_batches_in_flight,
        )

    def event_routes(self) -> list[Route]:
        """Routes for the store's events queue."""
        return [
            Route(StateChanged, self.on_state_changed),
            Route(HostHeartbeat, self.on_heartbeat),
            Route(HostLost, self.on_host_lost),
        ]

    def command_routes(self) -> list[Route]:
        """Routes of this service on the store's commands queue."""
        return [
            Route(RetrieveState, self.on_retrieve),
            Route(RestoreState, self.on_restore),
            *self._resets.command_routes(),
        ]

    def _host_user(self, host: str) -> str | None:
        """The AMQP user a host's replies must come from (None: not checked)."""
        return host if self._settings.verify_host_identity else None

    def _speaks_for(self, delivery: Delivery, host: str) -> bool:
        """Whether the broker-validated publisher may speak for ``host`` (invariant 3)."""
        return not self._settings.verify_host_identity or delivery.user_id == host

    async def close(self) -> None:
        """Stop batched pulls and coalesced writes still in flight (after the consumers
        stopped)."""
        await self._batcher.close()
        await self._changes.close()
        await self._writer.close()

    async def on_state_changed(self, envelope: Envelope[StateChanged], delivery: Delivery) -> None:
        """Store each announced state unless it is already stored, superseded by a newer
        stored one, or the host may not write it: as sent inline when it came so and opens,
        else pulled. The event is acknowledged once every write it asked for landed (raises
        the first failure otherwise: the event is redelivered, and what was stored
        meanwhile is then a duplicate)."""
        event = envelope.data
        announced = [_Announced(change, event.host, delivery) for change in event.changes]
        outcomes = await self._changes.call(announced)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        to_pull = [
            item.change
            for item, outcome in zip(announced, outcomes, strict=True)
            if outcome is _Taken.PULL
        ]
        if to_pull:
            async with self._admission.admit(len(to_pull)):
                pulls = [self._batcher.pull(event.host, c.vm_id, c.kind) for c in to_pull]
                for failure in await asyncio.gather(*pulls, return_exceptions=True):
                    if isinstance(failure, BaseException):
                        raise failure

    async def _take_changes(self, announced: list[_Announced]) -> list[_Outcome]:
        """Check the changes of the events that arrived together against the stored heads
        and placements (one read), and write every inline state that passes in one call:
        what each change came to, in order. Those to fetch are left to their events, so a
        host slow to answer holds up only its own."""
        async with self._admission.admit(len(announced)):
            stored = await self._repository.heads_and_placements(
                [(item.change.vm_id, item.change.kind) for item in announced]
            )
            outcomes: list[_Outcome] = [_Taken.DONE] * len(announced)
            announce_again: list[StateChange] = []
            to_store: dict[tuple[str, StateKind], int] = {}
            for index, (item, (head, placement)) in enumerate(zip(announced, stored, strict=True)):
                verdict = await self._check(item, head, placement)
                if verdict is _Check.ANNOUNCE_AGAIN:
                    announce_again.append(item.change)
                elif verdict is _Check.STORE:
                    key = (item.change.vm_id, item.change.kind)
                    earlier = to_store.get(key)
                    # One event naming the same state twice (only a faulty host does):
                    # the newer one is written, for both.
                    if earlier is None or item.change.token.is_newer_than(
                        announced[earlier].change.token
                    ):
                        to_store[key] = index
            # Together, not one after another: a redelivered event of a hundred stored
            # changes was two hundred Redis round trips in a row, under the load that
            # redelivered it.
            await asyncio.gather(
                *(self._announce_head(change.vm_id, change.kind) for change in announce_again)
            )
            await self._store_inline(announced, sorted(to_store.values()), outcomes)
        return outcomes

    async def _check(
        self, item: _Announced, head: StoredHead | None, placement: Placement | None
    ) -> _Check:
        """What to do with one announced change, given its VM's stored head and placement
        (a refusal is announced here)."""
        change = item.change
        if head is not None and head.content_hash == change.content_hash:
            # A replica may have died between the durable write and its announcement;
            # announcing the stored version again is harmless (facts are idempotent).
            return _Check.ANNOUNCE_AGAIN if item.delivery.redelivered else _Check.SKIP
        if not self._speaks_for(item.delivery, item.host):
            await self._writer.refuse(
                change.vm_id,
                change.kind,
                item.host,
                f"published by AMQP user {item.delivery.user_id!r}, not by the host",
            )
            return _Check.SKIP
        if placement is None or placement.host != item.host:
            await self._writer.refuse(
                change.vm_id, change.kind, item.host, "host is not the VM's placement"
            )
            return _Check.SKIP
        if head is not None and not change.token.is_newer_than(head.token):
            # Superseded: a state the host made after this one is stored already (a pull
            # takes the host's current state, not the one announced). After an outage the
            # queue holds many such events per VM; pulling for each kept every replica busy
            # for seconds while the newest changes waited behind them.
            return _Check.SKIP
        return _Check.STORE

    async def _store_inline(
        self, announced: list[_Announced], indices: list[int], outcomes: list[_Outcome]
    ) -> None:
        """Open the inline states of ``indices`` (only now, past every check) and persist
        them in one call, so the writer coalesces them as it does fetched batches; record
        each change's outcome (PULL for one announced by its hash or that does not open)."""
        by_vm: dict[str, tuple[str, list[StateBlob], list[int]]] = {}
        for index in indices:
            item = announced[index]
            blob = self._inline.open(item.host, item.change)
            if blob is None:
                outcomes[index] = _Taken.PULL
                continue
            _host, blobs, of_vm = by_vm.setdefault(item.change.vm_id, (item.host, [], []))
            blobs.append(blob)
            of_vm.append(index)
        if not by_vm:
            return
        results = await self._writer.persist_from(
            [
                (host, FetchedVmState(vm_id=vm_id, blobs=blobs))
                for vm_id, (host, blobs, _) in by_vm.items()
            ]
        )
        for vm_id, (_host, _blobs, of_vm) in by_vm.items():
            failure = results.get(vm_id)
            if failure is not None:
                for index in of_vm:
                    outcomes[index] = failure

    async def on_heartbeat(self, envelope: Envelope[HostHeartbeat], delivery: Delivery) -> None:
        """Reconcile: pull any hash in the host's inventory that the store has not seen, so a
        lost event costs at most one heartbeat."""
        beat = envelope.data
        if not self._speaks_for(delivery, beat.host):
            log.warning("heartbeat ignored: publisher is not the host", host=beat.host)
            return
        # Commands to the host go at the versions its release reads (checked just above).
        self._bus.levels.learn(host_command_key(beat.host), beat.release)
        if beat.sealing_key is not None:
            # Trusted because the broker says the host sent it (checked just above).
            await self.sealing.hosts.learn(beat.host, SealingPublicKey.from_text(beat.sealing_key))
        stored = await self._repository.placements_and_head_hashes(
            [entry.vm_id for entry in beat.vms]
        )
        behind: list[str] = []
        for entry in beat.vms:
            placement, heads = stored[entry.vm_id]
            if placement is None or placement.host != beat.host or placement.epoch != entry.epoch:
                continue
            announced = {StateKind.TPM: entry.tpm_hash, StateKind.NVRAM: entry.nvram_hash}
            if any(
                digest is not None and digest != heads[kind] for kind, digest in announced.items()
            ):
                behind.append(entry.vm_id)
        if behind:
            log.info("reconciling from heartbeat", host=beat.host, vms=len(behind))
            await self.pull_and_persist(beat.host, behind, list(StateKind))

    async def on_host_lost(self, envelope: Envelope[HostLost], _delivery: Delivery) -> None:
        """Seal nothing more to a host policy declared lost (its key is dropped)."""
        await self.sealing.hosts.forget(envelope.data.host)

    async def on_retrieve(
        self, envelope: Envelope[RetrieveState], delivery: Delivery
    ) -> RetrieveStateReply:
        """Pull the VM's state now (before a destroy) and report the newest stored versions.
        Done only when every state the host holds for it is what the store now holds: a VM
        the host does not hold, a blob that does not verify or a write the fence refused is
        a failure with its reason, never a retrieval."""
        request = envelope.data
        metrics.RETRIEVAL_ATTEMPTS.inc()
        try:
            vm_states, missing = await self._fetch(request.host, [request.vm_id], list(StateKind))
            if request.vm_id in missing:
                raise RetrievalError(f"host {request.host} does not hold the VM")
            fetched = [vm_state for vm_state in vm_states if vm_state.vm_id == request.vm_id]
            failure = (await self._writer.persist(request.host, fetched)).get(request.vm_id)
            if failure is not None:
                raise RetrievalError(f"persisting failed: {type(failure).__name__}")
            for vm_state in fetched:
                await self._check_stored(request.vm_id, vm_state.blobs)
        except (CallError, MessageError, RetrievalError) as error:
            metrics.RETRIEVAL_FAILURES.inc()
            return RetrieveStateReply.failed(str(error))
        versions = {}
        for kind in StateKind:
            version = await self._repository.head_version(request.vm_id, kind)
            if version is not None:
                versions[kind] = version
        return RetrieveStateReply(ok=True, versions=versions)

    async def on_restore(
        self, envelope: Envelope[RestoreState], delivery: Delivery
    ) -> RestoreStateReply:
        """Send stored state (newest, or the versions asked for) to the host the VM is about
        to start on, each version verified first."""
        request = envelope.data
        blobs: dict[StateKind, StateBlob] = {}
        try:
            plan = await plan_restore(request, self._repository, self._snapshots)
            for kind, version in plan.items():
                blobs[kind] = (await self._reader.read(request.vm_id, kind, version)).blob
            # An encrypted TPM needs its secret on the host; a VM that asks for encryption
            # gets one made on its first start, before swtpm ever writes its state.
            secret = await (
                self._secrets.held_or_created(request.vm_id)
                if request.encrypt_tpm_state
                else self._secrets.held(request.vm_id)
            )
            host_key = await self.sealing.hosts.await_key_of(
                request.host, self._settings.host_key_wait_s
            )
        except (RestoreRefusedError, VersionNotKeptError, HostKeyUnknownError) as error:
            return RestoreStateReply.failed(str(error))
        except (VersionUnreadableError, DecryptionError) as error:
            log.error("stored state does not verify", vm_id=request.vm_id, reason=str(error))
            return RestoreStateReply.failed(f"stored state does not verify: {error}")
        tpm_version = plan.get(StateKind.TPM)
        if tpm_version is not None:
            # Before the host writes it, so its first write is judged against it: a version
            # of another TPM that a restore asked for is the VM's own from now on.
            await self._resets.after_restore(request.vm_id, tpm_version)
        # Sealed to the host's key and bound to this start's epoch: the command rests in
        # the host's queue (and its dead-letter queue if refused), never the state in clear.
        sealed = {
            kind: seal_state_blob(request.vm_id, blob, host_key, command_epoch=request.epoch)
            for kind, blob in blobs.items()
        }
        prepare = PrepareVm(
            vm_id=request.vm_id,
            name=request.name,
            epoch=request.epoch,
            tpm=sealed.get(StateKind.TPM),
            nvram=sealed.get(StateKind.NVRAM),
            tpm_secret=(
                seal_tpm_secret(request.vm_id, secret, host_key, command_epoch=request.epoch)
                if secret is not None
                else None
            ),
        )
        try:
            reply = await self._bus.call(
                host_command_key(request.host),
                prepare,
                PrepareVmReply,
                subject=request.vm_id,
                timeout_s=self._settings.prepare_timeout_s,
                replier=self._host_user(request.host),
            )
        except CallTimeoutError as error:
            # The host may yet write the state (until the command's deadline): say so, so
            # policy and the CLI can tell a silent host from a refusal.
            return RestoreStateReply.failed(str(error), timed_out=True)
        except CallError as error:
            return RestoreStateReply.failed(str(error))
        if not reply.data.ok:
            return RestoreStateReply.failed(reply.data.error or "the host gave no reason")
        secret_id = secret.uuid if secret is not None else None
        log.info(
            "state restored",
            vm_id=request.vm_id,
            host=request.host,
            versions={kind.value: version for kind, version in plan.items()},
            tpm_secret_id=secret_id,
        )
        # Policy names the secret in the domain's <encryption secret>.
        return RestoreStateReply(ok=True, versions=dict(plan), tpm_secret_uuid=secret_id)

    async def pull_and_persist(
        self, host: str, vm_ids: list[str], kinds: list[StateKind]
    ) -> dict[str, BaseException | None]:
        """Fetch the VMs' stable state from ``host`` (in batches) and persist each blob now,
        without waiting for other requests to join. Raises when a fetch fails."""
        results: dict[str, BaseException | None] = {}
        unique = list(dict.fromkeys(vm_ids))
        size = self._settings.pull_batch_max_vms
        for start in range(0, len(unique), size):
            chunk = {vm_id: set(kinds) for vm_id in unique[start : start + size]}
            results.update(await self._pull_batch(host, chunk))
        return results

    async def _pull_batch(
        self, host: str, kinds_by_vm: dict[str, set[StateKind]]
    ) -> Mapping[str, BaseException | None]:
        """One fetch for these VMs, then each blob persisted; a failed write is reported
        for its VM only, so the others' events are still acknowledged."""
        kinds = sorted({kind for wanted in kinds_by_vm.values() for kind in wanted})
        vm_ids = list(kinds_by_vm)
        vm_states, _missing = await self._fetch(host, vm_ids, kinds)
        # Only what was asked for is written: a reply is no way to push other VMs' state. A
        # host pushes state only inline with its own announcement, which passes the same
        # identity, placement and fencing checks first (see handlers.inline_state).
        fetched = [vm_state for vm_state in vm_states if vm_state.vm_id in kinds_by_vm]
        results: dict[str, BaseException | None] = dict.fromkeys(vm_ids)
        results.update(await self._writer.persist(host, fetched))
        return results

    async def _fetch(
        self, host: str, vm_ids: list[str], kinds: list[StateKind]
    ) -> tuple[list[FetchedVmState], list[str]]:
        """One ``state.fetch`` to ``host``, answered by the host's own user: the opened
        state of each VM it holds, and the VMs it does not hold. A reply that does not open
        (sealed to another key, or altered) is a `MessageError`."""
        try:
            reply = await self._bus.call(
                host_command_key(host),
                FetchState(vm_ids=vm_ids, kinds=kinds),
                StateFetched,
                subject=vm_ids[0],
                timeout_s=self._settings.fetch_timeout_s,
                replier=self._host_user(host),
            )
        except BaseException:
            metrics.PULLS.labels(outcome="failed").inc()
            raise
        try:
            opened = self.sealing.open_fetched(reply.data.vms)
        except SealingError as error:
            metrics.PULLS.labels(outcome="failed").inc()
            log.error("fetch reply does not open", host=host, reason=str(error))
            raise MessageError(f"fetch reply from {host} does not open: {error}") from None
        metrics.PULLS.labels(outcome="ok").inc()
        return opened, reply.data.missing

    async def _check_stored(self, vm_id: str, blobs: list[StateBlob]) -> None:
        """Raise RetrievalError unless each of the host's blobs is the stored head of its
        kind (a refused write leaves another head: the host's newest state is not stored)."""
        heads = await self._repository.heads_and_placements([(vm_id, blob.kind) for blob in blobs])
        for blob, (head, _placement) in zip(blobs, heads, strict=True):
            if head is None or head.content_hash != blob.content_hash:
                raise RetrievalError(
                    f"the host's newest {blob.kind.value} state was not stored "
                    "(refused: see the state.refused event)"
                )

    async def _announce_head(self, vm_id: str, kind: StateKind) -> None:
        version = await self._repository.head_version(vm_id, kind)
        stored = await self._reader.fetch(vm_id, kind, version) if version else None
        record = stored.record() if stored is not None else None
        if record is None or record.origin is not VersionOrigin.HOST:
            return
        await self._bus.publish_event(
            StatePersisted(
                vm_id=vm_id,
                kind=kind,
                content_hash=record.content_hash,
                size=record.size,
                token=record.token,
                version=record.version,
                host=record.host,
            ),
            subject=vm_id,
        )
        if kind is StateKind.TPM:
            await self._resets.announce_pending(vm_id, record.version)
