"""The store's Redis schema on a real Redis Cluster (three primaries, one replica each, TLS,
the ACL users): versions written and read back, fencing, and a primary killed.

The store reaches the cluster as it would in production (``KEEPER_STORE_REDIS_CLUSTER_NODES``
through `connect_redis`, its own ACL user), with every write waiting for one replica of
its shard (``redis_min_replicas = 1``). After a primary is SIGKILLed and its replica took
over, every version acknowledged before is still there, and writes go on. The store's
services on the real broker (pull on ``state.changed``, persist, ``state.persisted``) run
on the same cluster before and after.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Callable, Sequence

import pytest
import pytest_asyncio
from redis.asyncio import Redis
from redis.crc import key_slot
from redis.exceptions import RedisError

from keeper_devtools.localstack.redis_cluster import RedisClusterGroup
from keeper_devtools.localstack.redis_users import ADMIN, POLICY, STORE, RedisUsers
from keeper_shared.messages.state import StatePersisted
from keeper_shared.messages.types import FencingToken, StateKind
from keeper_shared.redis_access.connection import RedisSettings, connect_redis
from keeper_shared.redis_access.keys import placement_key
from keeper_shared.redis_access.results import awaited
from keeper_shared.state_format.blobs import seal_blob
from keeper_shared.state_format.tpm_archive import MAIN_STATE_FILE_NAME, pack_tpm_state
from keeper_state_store.crypto.encryption import KeyEncryptionKey
from keeper_state_store.crypto.key_ring import KeyRing
from keeper_state_store.crypto.sealing import BlobSealer
from keeper_state_store.storage.durability import ensure_durable
from keeper_state_store.storage.replication import NotReplicatedError, ReplicaQuorum
from keeper_state_store.storage.repository import (
    StateRepository,
    VersionWrite,
    WriteOutcome,
    WriteResult,
)
from keeper_state_store.storage.version_reader import VersionReader
from support.in_process_store import Store, running_store, sha256
from support.vm_keys import vm_keys

pytestmark = [pytest.mark.redis, pytest.mark.rabbit, pytest.mark.timeout(120)]

VM_COUNT = 24
"""Enough VMs that every shard holds some (checked)."""
PLACED: dict[str | bytes, str | int] = {"host": "host-a", "epoch": 1}
"""The placement every VM of the test has (policy's, which the store fences on)."""
WRITE_ATTEMPTS = 40
"""How often a write is tried again while the cluster settles (a redelivery would)."""


def _settings(cluster: RedisClusterGroup, users: RedisUsers, user: str) -> RedisSettings:
    login, password = users.login(user)
    tls = cluster.tls
    assert tls is not None
    return RedisSettings(
        redis_url=f"rediss://{login}:{password}@127.0.0.1/0?ssl_ca_certs={tls.ca}",
        redis_cluster_nodes=cluster.startup_nodes,
    )


@pytest_asyncio.fixture
async def store_redis(
    private_redis_cluster: RedisClusterGroup, redis_users: RedisUsers
) -> AsyncIterator[Redis]:
    """The store's client of the cluster, as its own ACL user."""
    client = connect_redis(_settings(private_redis_cluster, redis_users, STORE))
    try:
        yield client
    finally:
        await client.aclose()


@pytest_asyncio.fixture
async def policy_redis(
    private_redis_cluster: RedisClusterGroup, redis_users: RedisUsers
) -> AsyncIterator[Redis]:
    """Policy's client: it writes the placements the store fences on."""
    client = connect_redis(_settings(private_redis_cluster, redis_users, POLICY))
    try:
        yield client
    finally:
        await client.aclose()


@pytest_asyncio.fixture
async def bus_store(
    private_redis_cluster: RedisClusterGroup,
    redis_users: RedisUsers,
    rabbitmq_url: str,
    kek: KeyEncryptionKey,
) -> AsyncIterator[Store]:
    """The store's services on the real broker (private queues, a fake host) with the
    cluster as their Redis; the admin's login, as it also writes the placements."""
    settings = _settings(private_redis_cluster, redis_users, ADMIN)
    async with running_store(
        rabbitmq_url,
        settings.redis_url,
        kek,
        redis_cluster_nodes=settings.redis_cluster_nodes,
    ) as store:
        yield store


async def _changes_through_the_bus(store: Store, vm_ids: Sequence[str], generation: int) -> None:
    """Each VM's TPM changes on the fake host and is announced: the store pulls, seals and
    persists it on the cluster and says so with ``state.persisted``."""
    persisted = await store.client.watch_events(f"state.persisted.{store.origin}")
    contents = {}
    for vm_id in vm_ids:
        await store.place(vm_id, epoch=1)
        contents[vm_id] = pack_tpm_state({MAIN_STATE_FILE_NAME: os.urandom(64) * 40})
        store.host.hold(
            vm_id, StateKind.TPM, contents[vm_id], FencingToken(epoch=1, generation=generation)
        )
    await store.host.announce_together(list(vm_ids), StateKind.TPM)
    for vm_id in vm_ids:
        await persisted.wait_for(StatePersisted, _about(vm_id), 30.0)
        assert await store.repository.head_hash(vm_id, StateKind.TPM) == sha256(contents[vm_id])


def _about(vm_id: str) -> Callable[[StatePersisted], bool]:
    return lambda event: event.vm_id == vm_id


def _blob_write(
    vm_id: str, kind: StateKind, generation: int, sealer_output: bytes, content: bytes
) -> VersionWrite:
    blob = seal_blob(kind, content, FencingToken(epoch=1, generation=generation))
    return VersionWrite(
        vm_id=vm_id,
        kind=kind,
        host="host-a",
        token=blob.token,
        content_hash=blob.content_hash,
        size=blob.size,
        sealed=sealer_output,
    )


async def _write(
    repository: StateRepository, vm_ids: Sequence[str], generation: int, epoch: int = 1
) -> dict[tuple[str, StateKind], bytes]:
    """Write a new version of both kinds of every VM until each is acknowledged (stored or
    a duplicate of a try that got through); the contents written."""
    sealer = BlobSealer(repository)
    contents = {
        (vm_id, kind): os.urandom(64) + f"{vm_id} {kind.value} {generation}".encode()
        for vm_id in vm_ids
        for kind in StateKind
    }
    pending = dict(contents)
    for _ in range(WRITE_ATTEMPTS):
        blobs = [
            (vm_id, seal_blob(kind, content, FencingToken(epoch=epoch, generation=generation)))
            for (vm_id, kind), content in pending.items()
        ]
        try:
            sealed = await sealer.seal_all(blobs)
            results = await repository.write_versions(
                [
                    VersionWrite(
                        vm_id=vm_id,
                        kind=blob.kind,
                        host="host-a",
                        token=blob.token,
                        content_hash=blob.content_hash,
                        size=blob.size,
                        sealed=ciphertext,
                    )
                    for (vm_id, blob), ciphertext in zip(blobs, sealed, strict=True)
                ]
            )
        except (NotReplicatedError, RedisError):
            await asyncio.sleep(0.5)
            continue
        for key, result in zip(list(pending), results, strict=True):
            if isinstance(result, WriteResult):
                assert result.outcome in (WriteOutcome.STORED, WriteOutcome.DUPLICATE), result
                del pending[key]
        if not pending:
            return contents
        await asyncio.sleep(0.5)
    raise AssertionError(f"{len(pending)} writes not acknowledged after {WRITE_ATTEMPTS} tries")


async def _read_back(
    repository: StateRepository, written: dict[tuple[str, StateKind], bytes], version: int
) -> None:
    reader = VersionReader(repository.redis, repository.keys)
    for (vm_id, kind), content in written.items():
        verified = await reader.read(vm_id, kind, version)
        assert verified.content == content, (vm_id, kind, version)


async def test_the_store_writes_reads_fences_and_survives_a_primary_kill(
    private_redis_cluster: RedisClusterGroup,
    store_redis: Redis,
    policy_redis: Redis,
    bus_store: Store,
    kek: KeyEncryptionKey,
) -> None:
    cluster = private_redis_cluster
    vm_ids = [str(uuid.uuid4()) for _ in range(VM_COUNT)]
    bus_vms = [bus_store.new_vm() for _ in range(VM_COUNT // 2)]
    # The whole store path: an announced change pulled from its host and persisted.
    await _changes_through_the_bus(bus_store, bus_vms, generation=1)
    # Every key of a VM in one slot, as the server computes it.
    for label, key in vm_keys(vm_ids[0]).items():
        server_slot = cluster.ask(cluster.servers[0], "CLUSTER", "KEYSLOT", key)
        assert server_slot == key_slot(vm_ids[0].encode()), label
    shards = {cluster.primary_of_slot(key_slot(vm.encode())).config.port for vm in vm_ids}
    assert len(shards) == 3, "the VMs should spread over every shard"
    for vm_id in vm_ids:
        await awaited(policy_redis.hset(placement_key(vm_id), mapping=PLACED))
    # The store's start-up check asks every node, replicas too.
    assert await ensure_durable(store_redis, allow_volatile=False) == (
        "appendonly=yes appendfsync=always (6 nodes)"
    )
    repository = StateRepository(
        store_redis, KeyRing(kek), history_depth=3, replicas=ReplicaQuorum(1, 2000)
    )

    first = await _write(repository, vm_ids, generation=1)
    await _read_back(repository, first, version=1)

    # Fencing: a token no newer than the head's is refused, an older epoch too.
    sealer = BlobSealer(repository)
    stale_blob = seal_blob(StateKind.TPM, b"stale", FencingToken(epoch=1, generation=1))
    (stale_sealed,) = await sealer.seal_all([(vm_ids[0], stale_blob)])
    stale = _blob_write(vm_ids[0], StateKind.TPM, 1, stale_sealed, b"stale")
    assert await repository.write_version(stale) == WriteResult(WriteOutcome.STALE, "1")
    await awaited(policy_redis.hset(placement_key(vm_ids[1]), "epoch", "2"))
    older_epoch = _blob_write(vm_ids[1], StateKind.TPM, 9, stale_sealed, b"stale")
    assert await repository.write_version(older_epoch) == WriteResult(WriteOutcome.STALE_EPOCH, "2")
    await awaited(policy_redis.hset(placement_key(vm_ids[1]), "epoch", "1"))

    # WAIT counts each shard's own replicas: one each, so asking for two must fail (on a
    # VM of its own: the write itself reached the primary, unacknowledged).
    greedy = StateRepository(
        store_redis, KeyRing(kek), history_depth=3, replicas=ReplicaQuorum(2, 100)
    )
    other_vm = str(uuid.uuid4())
    await awaited(policy_redis.hset(placement_key(other_vm), mapping=PLACED))
    unwaited = _blob_write(other_vm, StateKind.TPM, 5, stale_sealed, b"stale")
    with pytest.raises(NotReplicatedError, match="1 of 2 replicas"):
        await greedy.write_version(unwaited)

    # A primary crashes; its replica takes over. Writes acknowledged with WAIT survive.
    slot = key_slot(vm_ids[0].encode())
    killed = cluster.primary_of_slot(slot)
    killed.kill()
    cluster.wait_for_primary_change(slot, killed)
    await _read_back(repository, first, version=1)
    # The old primary returns as the new one's replica, so writes have a replica to wait for.
    killed.start()
    cluster.wait_for_replicas()

    second = await _write(repository, vm_ids, generation=2)
    await _changes_through_the_bus(bus_store, bus_vms, generation=2)
    await _read_back(repository, second, version=2)
    await _read_back(repository, first, version=1)
    for vm_id in vm_ids:
        for kind in StateKind:
            assert await repository.head_version(vm_id, kind) == 2
