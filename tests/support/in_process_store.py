"""An in-process state store on the real broker and Redis, a fake host agent that answers
its commands, and a client that talks to that store.

The store is the real `StateService`, `HistoryService`, `TransferService`,
`DeletionService` and `StoreQueries` on a real `BusClient`, consuming queues private to the
test (bound to the fake host's events and to a command key of its own), so tests sharing the
session's broker never see each other's messages. Policy's queries (`PolicyQueries`) can run
beside it the same way, for the CLI. The fake host holds canonical state in memory, answers
``state.fetch`` with it (counting every fetch) and records each ``vm.prepare``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import aio_pika
from redis.asyncio import Redis

from keeper_policy.gateway import Gateway
from keeper_policy.hosts.registry import HostRegistry
from keeper_policy.settings import PolicySettings
from keeper_policy.snapshot.deleter import SnapshotDeleter
from keeper_policy.snapshot.memory_records import MemorySnapshots
from keeper_policy.storage.scripts import PolicyScripts
from keeper_policy.storage.vm_registry import PolicyRegistry
from keeper_policy.templates.handlers import TemplateHandlers
from keeper_policy.templates.records import TemplateRecords
from keeper_policy.tpm.approver import Approver
from keeper_policy.views.queries import PolicyQueries
from keeper_policy.workflows.engine import WorkflowEngine
from keeper_policy.workflows.store import WorkflowStore
from keeper_shared.bus.client import BusClient, Consumer, Delivery, Route
from keeper_shared.bus.topology import QueueSpec, host_command_queue
from keeper_shared.keeper_client.client import KeeperClient
from keeper_shared.messages.envelope import Envelope
from keeper_shared.messages.replies import PrepareVmReply
from keeper_shared.messages.sealed import SealedTpmSecret
from keeper_shared.messages.state import (
    FetchState,
    SealedVmState,
    StateChange,
    StateChanged,
    StateFetched,
)
from keeper_shared.messages.types import FencingToken, StateBlob, StateKind, TpmSecret
from keeper_shared.messages.vm import PrepareVm
from keeper_shared.redis_access.connection import connect_redis
from keeper_shared.redis_access.keys import placement_key, state_blobs_key
from keeper_shared.redis_access.results import awaited
from keeper_shared.sealing.keys import SealingPrivateKeys, SealingPublicKey
from keeper_shared.sealing.state_blobs import (
    open_state_blob,
    open_tpm_secret,
    seal_state_blob,
    seal_tpm_secret,
)
from keeper_shared.state_format.blobs import open_blob, seal_blob
from keeper_state_store.crypto.encryption import KeyEncryptionKey
from keeper_state_store.crypto.key_ring import KeyRing
from keeper_state_store.handlers.deletion import DeletionService
from keeper_state_store.handlers.history import HistoryService
from keeper_state_store.handlers.state import StateService
from keeper_state_store.handlers.transfer import TransferService
from keeper_state_store.settings import StateStoreSettings
from keeper_state_store.storage.repository import StateRepository
from keeper_state_store.views.queries import StoreQueries
from support.sealing_keys import forget_hosts, new_keys, register_host, store_sealing

REQUEST_TIMEOUT_S = 30.0


def unique(label: str) -> str:
    """A name no other test uses (host ids must stay short and lowercase)."""
    return f"{label}-{uuid.uuid4().hex[:10]}"


@dataclass(frozen=True)
class OpenedPrepare:
    """A ``vm.prepare`` as the host opened it with its key: what it would write."""

    vm_id: str
    name: str
    epoch: int
    tpm: StateBlob | None
    nvram: StateBlob | None
    tpm_secret: TpmSecret | None


@dataclass
class FakeHost:
    """A host agent reduced to its commands: state in memory, fetches counted; it seals
    fetch replies to the store's key and opens prepares with its own, as the agent does."""

    host_id: str
    bus: BusClient
    store_key: SealingPublicKey
    keys: SealingPrivateKeys = field(default_factory=new_keys)
    state: dict[str, dict[StateKind, StateBlob]] = field(default_factory=dict)
    fetches: list[list[str]] = field(default_factory=list)
    prepared: list[OpenedPrepare] = field(default_factory=list)
    sealed_prepares: list[PrepareVm] = field(default_factory=list)
    """The prepares as they arrived on the bus."""
    tpm_secrets: dict[str, TpmSecret] = field(default_factory=dict)
    """Secrets the keeper did not create that the host reads from its domains' TPMs."""
    answering: asyncio.Event = field(default_factory=asyncio.Event)
    """Set: fetches are answered at once; cleared, each fetch is counted and its answer
    waits until it is set again (a host slow to answer)."""

    def __post_init__(self) -> None:
        self.answering.set()

    def hold(self, vm_id: str, kind: StateKind, content: bytes, token: FencingToken) -> StateBlob:
        """Make ``content`` the VM's current stable state of ``kind`` on this host."""
        blob = seal_blob(kind, content, token)
        self.state.setdefault(vm_id, {})[kind] = blob
        return blob

    async def announce(
        self, vm_id: str, kind: StateKind, *, inline_to: SealingPublicKey | None = None
    ) -> None:
        """Publish ``state.changed`` for what the host holds, as the agent does."""
        await self.announce_together([vm_id], kind, inline_to=inline_to)

    async def announce_together(
        self, vm_ids: list[str], kind: StateKind, *, inline_to: SealingPublicKey | None = None
    ) -> None:
        """One ``state.changed`` for these VMs' states, as the agent sends what it found
        stable while its previous announcement was on its way: by their hashes alone (as
        the agent announces a blob above its inline cap or a VM with a foreign TPM secret),
        or with ``inline_to`` each blob sealed inline to that key (the store's, normally)."""
        event = StateChanged(
            host=self.host_id,
            changes=[self.change(vm_id, kind, inline_to=inline_to) for vm_id in vm_ids],
        )
        await self.bus.publish_event(event, subject=self.host_id)

    def change(
        self, vm_id: str, kind: StateKind, *, inline_to: SealingPublicKey | None = None
    ) -> StateChange:
        """The change announcing what the host holds, its blob sealed inline to
        ``inline_to`` when given."""
        blob = self.state[vm_id][kind]
        return StateChange(
            vm_id=vm_id,
            kind=kind,
            content_hash=blob.content_hash,
            size=blob.size,
            token=blob.token,
            sealed=None if inline_to is None else seal_state_blob(vm_id, blob, inline_to),
        )

    def last_prepared(self, vm_id: str) -> OpenedPrepare:
        """The newest prepare the host got for ``vm_id``."""
        return next(p for p in reversed(self.prepared) if p.vm_id == vm_id)

    async def on_fetch(self, envelope: Envelope[FetchState], _delivery: Delivery) -> StateFetched:
        request = envelope.data
        self.fetches.append(list(request.vm_ids))
        await self.answering.wait()
        found = [
            SealedVmState(
                vm_id=vm_id,
                blobs=[
                    seal_state_blob(vm_id, blob, self.store_key)
                    for kind, blob in self.state[vm_id].items()
                    if kind in request.kinds
                ],
                tpm_secret=self._sealed_secret(vm_id),
            )
            for vm_id in request.vm_ids
            if vm_id in self.state
        ]
        missing = [vm_id for vm_id in request.vm_ids if vm_id not in self.state]
        return StateFetched(vms=found, missing=missing)

    def _sealed_secret(self, vm_id: str) -> SealedTpmSecret | None:
        secret = self.tpm_secrets.get(vm_id)
        return seal_tpm_secret(vm_id, secret, self.store_key) if secret is not None else None

    async def on_prepare(
        self, envelope: Envelope[PrepareVm], _delivery: Delivery
    ) -> PrepareVmReply:
        request = envelope.data
        self.sealed_prepares.append(request)
        epoch = request.epoch
        # Like the agent: open and verify what arrived before accepting it.
        opened = OpenedPrepare(
            vm_id=request.vm_id,
            name=request.name,
            epoch=epoch,
            tpm=(
                open_state_blob(request.vm_id, request.tpm, self.keys, command_epoch=epoch)
                if request.tpm is not None
                else None
            ),
            nvram=(
                open_state_blob(request.vm_id, request.nvram, self.keys, command_epoch=epoch)
                if request.nvram is not None
                else None
            ),
            tpm_secret=(
                open_tpm_secret(request.vm_id, request.tpm_secret, self.keys, command_epoch=epoch)
                if request.tpm_secret is not None
                else None
            ),
        )
        for blob in (opened.tpm, opened.nvram):
            if blob is not None:
                open_blob(blob)
        self.prepared.append(opened)
        return PrepareVmReply(
            ok=True,
            tpm_hash=opened.tpm.content_hash if opened.tpm else None,
            nvram_hash=opened.nvram.content_hash if opened.nvram else None,
        )


def prepared_content(prepare: OpenedPrepare, kind: StateKind) -> bytes | None:
    """The canonical content a prepare carried for ``kind`` (verified), None if none."""
    blob = prepare.tpm if kind is StateKind.TPM else prepare.nvram
    return open_blob(blob) if blob is not None else None


@dataclass
class Store:
    """One in-process store replica and a client pointed at it."""

    redis: Redis
    repository: StateRepository
    service: StateService
    client: KeeperClient
    host: FakeHost
    origin: str
    """The store's bus origin: its events' routing keys end in it."""
    amqp_url: str
    events_queue: str
    """Name of the store's events queue."""
    events_consumer: Consumer | None = None
    vm_ids: list[str] = field(default_factory=list)

    def new_vm(self) -> str:
        """A VM id whose Redis keys are deleted when the store stops."""
        vm_id = str(uuid.uuid4())
        self.vm_ids.append(vm_id)
        return vm_id

    async def place(self, vm_id: str, epoch: int, host: str | None = None) -> None:
        """Record the VM's placement as policy does (the fencing check reads it)."""
        mapping = {"host": host or self.host.host_id, "epoch": epoch}
        await awaited(self.redis.hset(placement_key(vm_id), mapping=mapping))

    async def wait_until_events_drained(self, timeout_s: float) -> None:
        """Until no event waits in the store's queue and none is being handled (so every
        one was acknowledged), twice in a row to step over a delivery in between."""
        assert self.events_consumer is not None
        connection = await aio_pika.connect(self.amqp_url)
        async with connection, asyncio.timeout(timeout_s):
            channel = await connection.channel()
            quiet = 0
            while quiet < 2:
                await asyncio.sleep(0.05)
                queue = await channel.declare_queue(self.events_queue, passive=True)
                ready = queue.declaration_result.message_count
                idle = ready == 0 and not self.events_consumer.in_flight
                quiet = quiet + 1 if idle else 0

    async def sealed(self, vm_id: str, kind: StateKind, version: int) -> bytes:
        """The ciphertext Redis holds for a version in the history."""
        value = await awaited(self.redis.hget(state_blobs_key(vm_id, kind), str(version)))
        assert value is not None
        # No decode_responses: the client returns bytes, whatever redis-py annotates.
        return bytes(cast(bytes, value))

    async def put_sealed(self, vm_id: str, kind: StateKind, version: int, sealed: bytes) -> None:
        """Overwrite a version's ciphertext in Redis behind the store's back."""
        await awaited(self.redis.hset(state_blobs_key(vm_id, kind), mapping={version: sealed}))

    async def pull(self, vm_id: str) -> None:
        """Have the store pull and persist what the fake host holds for ``vm_id`` now."""
        results = await self.service.pull_and_persist(self.host.host_id, [vm_id], list(StateKind))
        assert results[vm_id] is None, results


@contextlib.asynccontextmanager
async def running_store(
    amqp_url: str,
    redis_url: str,
    kek: KeyEncryptionKey,
    *,
    history_depth: int = 10,
    host_id: str | None = None,
    host_amqp_url: str | None = None,
    redis_cluster_nodes: Sequence[str] = (),
    fetch_timeout_s: float = 10.0,
) -> AsyncIterator[Store]:
    """Start a store on private queues, with its own fake host and client; clean up after.

    With ``host_amqp_url`` (a per-host broker user named ``host_id``) the store verifies
    host identities as in production; otherwise every party is the same user and it does
    not. With ``redis_cluster_nodes`` it reaches Redis as a Redis Cluster (``redis_url``
    then gives the login and TLS options). ``fetch_timeout_s`` bounds the store's wait for
    a host's fetch reply (shorter for a test whose fetch must go unanswered)."""
    host_id = host_id or unique("h")
    store_key = unique("test-store")
    events = QueueSpec(
        name=unique("test-store-events"),
        event_bindings=(f"state.changed.{host_id}", f"host.heartbeat.{host_id}"),
    )
    commands = QueueSpec(name=unique("test-store-commands"), command_key=store_key)
    host_queue = host_command_queue(host_id)
    settings = StateStoreSettings(
        amqp_url=amqp_url,
        redis_url=redis_url,
        redis_cluster_nodes=list(redis_cluster_nodes),
        kek_file=Path("/nonexistent/kek"),  # the KEK is handed over directly
        sealing_key_file=Path("/nonexistent/sealing"),  # keys handed over directly
        history_depth=history_depth,
        allow_volatile_redis=True,
        fetch_timeout_s=fetch_timeout_s,
        prepare_timeout_s=10.0,
        verify_host_identity=host_amqp_url is not None,
    )
    redis = connect_redis(settings)
    origin = unique("store")
    store_bus = await BusClient.connect(amqp_url, source=f"state-store/{origin}", origin=origin)
    host_bus = await BusClient.connect(
        host_amqp_url or amqp_url, source=f"host-agent/{host_id}", origin=host_id
    )
    client_bus = await BusClient.connect(amqp_url, source="client/test", origin=unique("client"))
    repository = StateRepository(redis, KeyRing(kek), history_depth=history_depth)
    sealing = store_sealing(redis)
    service = StateService(settings, repository, store_bus, sealing)
    host = FakeHost(host_id=host_id, bus=host_bus, store_key=sealing.own.public)
    await register_host(sealing, host_id, host.keys.public)
    store = Store(
        redis=redis,
        repository=repository,
        service=service,
        client=KeeperClient(
            client_bus,
            request_timeout_s=REQUEST_TIMEOUT_S,
            store_target=store_key,
            store_sealing_key=sealing.own.public,
        ),
        host=host,
        origin=origin,
        amqp_url=amqp_url,
        events_queue=events.name,
    )
    try:
        await host_bus.consume(
            host_queue,
            [Route(FetchState, host.on_fetch), Route(PrepareVm, host.on_prepare)],
            prefetch=8,
        )
        store.events_consumer = await store_bus.consume(events, service.event_routes(), prefetch=32)
        await store_bus.consume(
            commands,
            [
                *service.command_routes(),
                *HistoryService(repository).command_routes(),
                *TransferService(repository, sealing.own).command_routes(),
                *DeletionService(repository, store_bus).command_routes(),
                *StoreQueries(repository).command_routes(),
            ],
            prefetch=8,
        )
        yield store
    finally:
        for bus in (client_bus, store_bus, host_bus):
            await bus.close(5.0)
        await service.close()
        await _delete_queues(amqp_url, [events, commands, host_queue])
        await forget_hosts(redis, host_id)
        for vm_id in store.vm_ids:
            keys = [key async for key in redis.scan_iter(match=f"keeper:{{{vm_id}}}:*")]
            if keys:
                await redis.delete(*keys)
        await redis.aclose()


@contextlib.asynccontextmanager
async def running_policy_queries(
    amqp_url: str, redis: Redis, *, lost_after_s: float, store_target: str | None = None
) -> AsyncIterator[str]:
    """Policy's query handlers (``vms.list``, ``hosts.list``) over ``redis`` on a private
    commands queue; yields its command key (the CLI's ``KEEPER_POLICY_TARGET``). With
    ``store_target`` (a store's command key) also the template commands, which approve VMs
    as ``tpm.enable`` does and have that store copy and delete NVRAM, and snapshot deletion,
    which has that store unpin."""
    policy_key = unique("test-policy")
    commands = QueueSpec(name=unique("test-policy-commands"), command_key=policy_key)
    scripts = PolicyScripts(redis)
    registry, hosts = PolicyRegistry(redis, scripts), HostRegistry(redis, scripts)
    queries = PolicyQueries(registry, hosts, lost_after_s=lost_after_s)
    bus = await BusClient.connect(amqp_url, source="policy/test", origin=unique("policy"))
    routes = queries.command_routes()
    if store_target is not None:
        settings = PolicySettings(
            amqp_url=amqp_url, redis_url="redis://unused/", host_lost_after_s=lost_after_s
        )
        gateway = Gateway(bus, retrieve_timeout_s=REQUEST_TIMEOUT_S, host_command_timeout_s=5.0)
        templates = TemplateHandlers(
            TemplateRecords(redis, scripts),
            registry,
            Approver(settings, registry, hosts, gateway),
            gateway,
            store_timeout_s=REQUEST_TIMEOUT_S,
            store_target=store_target,
        )
        routes += templates.command_routes()
        engine = WorkflowEngine(
            WorkflowStore(redis, scripts), {}, lease_s=5.0, sweep_interval_s=1.0
        )
        deleter = SnapshotDeleter(
            MemorySnapshots(redis),
            hosts,
            engine,
            gateway,
            store_timeout_s=REQUEST_TIMEOUT_S,
            store_target=store_target,
        )
        routes += deleter.command_routes()
    try:
        await bus.consume(commands, routes, prefetch=8)
        yield policy_key
    finally:
        await bus.close(5.0)
        await _delete_queues(amqp_url, [commands])


async def _delete_queues(amqp_url: str, specs: list[QueueSpec]) -> None:
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        for spec in specs:
            for name in (spec.name, spec.dead_letter_queue):
                # Quorum queues: if_unused=True makes the broker close the connection.
                await channel.queue_delete(name, if_unused=False, if_empty=False)


def sha256(content: bytes) -> str:
    """Hex sha256, as the store names content."""
    return hashlib.sha256(content).hexdigest()
