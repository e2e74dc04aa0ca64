"""KEK rotation against a real Redis: every data key rewrapped once, atomically, in place.

The tests use a Redis database of their own (flushed around each test) on the session's
server, so the SCAN of every ``keeper:{*}:dek`` sees exactly the records made here.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import uuid

import pytest
from redis.asyncio import Redis

from keeper_shared.messages.types import FencingToken, StateKind
from keeper_shared.redis_access.keys import data_key_key, placement_key
from keeper_shared.redis_access.results import awaited
from keeper_state_store.crypto import key_rotation
from keeper_state_store.crypto.encryption import (
    DecryptionError,
    KeyEncryptionKey,
    WrappedKey,
    blob_associated_data,
    decrypt_blob,
    encrypt_blob,
    new_data_key,
    wrap_data_key,
)
from keeper_state_store.crypto.key_ring import KeyRing
from keeper_state_store.crypto.key_rotation import rotate_data_keys
from keeper_state_store.storage.repository import StateRepository, VersionWrite, WriteOutcome
from keeper_state_store.storage.version_reader import VersionReader
from support.redis_db import PrivateDatabase

pytestmark = pytest.mark.redis

VMS = 120


def _repository(redis: Redis, kek: KeyEncryptionKey) -> StateRepository:
    """The store's repository with ``kek`` as its only key-encryption key."""
    return StateRepository(redis, KeyRing(kek), history_depth=3)


@pytest.fixture
def redis(private_redis: PrivateDatabase) -> Redis:
    return private_redis.client


@pytest.fixture
def kek1() -> KeyEncryptionKey:
    return KeyEncryptionKey(os.urandom(32))


@pytest.fixture
def kek2() -> KeyEncryptionKey:
    return KeyEncryptionKey(os.urandom(32))


async def _store_vms(redis: Redis, kek: KeyEncryptionKey, count: int) -> dict[str, bytes]:
    """``count`` placed VMs, each with a data key wrapped by ``kek`` and one sealed TPM
    version; returns VM id -> the plaintext stored."""
    repository = _repository(redis, kek)
    stored: dict[str, bytes] = {}
    for _ in range(count):
        vm_id = str(uuid.uuid4())
        await awaited(redis.hset(placement_key(vm_id), mapping={"host": "host-a", "epoch": 1}))
        content = os.urandom(64)
        digest = hashlib.sha256(content).hexdigest()
        token = FencingToken(epoch=1, generation=1)
        data_key = await repository.data_key(vm_id)
        binding = blob_associated_data(vm_id, "tpm", 1, 1, digest)
        result = await repository.write_version(
            VersionWrite(
                vm_id=vm_id,
                kind=StateKind.TPM,
                host="host-a",
                token=token,
                content_hash=digest,
                size=len(content),
                sealed=encrypt_blob(data_key, content, binding),
            )
        )
        assert result.outcome is WriteOutcome.STORED
        stored[vm_id] = content
    return stored


async def _kek_ids(redis: Redis, vm_ids: list[str]) -> set[str]:
    values = await redis.mget([data_key_key(vm_id) for vm_id in vm_ids])
    return {WrappedKey.from_bytes(value).kek_id for value in values}


async def _read_all(
    redis: Redis, kek: KeyEncryptionKey, stored: dict[str, bytes]
) -> dict[str, bytes]:
    """Every VM's version 1 as a store holding only ``kek`` restores it."""
    repository = _repository(redis, kek)
    read: dict[str, bytes] = {}
    for vm_id in stored:
        found = await VersionReader(redis, repository.keys).fetch(vm_id, StateKind.TPM, 1)
        assert found is not None
        record, sealed = found.record(), found.copies[0].sealed
        assert record is not None
        assert sealed is not None
        binding = blob_associated_data(
            vm_id, "tpm", record.token.epoch, record.token.generation, record.content_hash
        )
        read[vm_id] = decrypt_blob(await repository.data_key(vm_id), sealed, binding)
    return read


async def test_rotation_rewraps_every_data_key_and_the_data_still_decrypts(
    redis: Redis, kek1: KeyEncryptionKey, kek2: KeyEncryptionKey
) -> None:
    stored = await _store_vms(redis, kek1, VMS)
    assert await _kek_ids(redis, list(stored)) == {kek1.key_id}
    # Before the rotation a store with only the new KEK cannot open the old records...
    with pytest.raises(DecryptionError):
        await _repository(redis, kek2).data_key(next(iter(stored)))
    # ...while a replica holding both (the rollout's middle step) reads all of them.
    both = KeyRing(kek2, [kek1])
    for value in await redis.mget([data_key_key(vm_id) for vm_id in stored]):
        both.unwrap(WrappedKey.from_bytes(value))

    report = await rotate_data_keys(redis, both)

    print(f"rotated {report.rewrapped} data keys in {report.seconds:.3f} s")
    assert report.scanned == VMS
    assert report.rewrapped == VMS
    assert report.already_current == 0
    assert report.complete
    assert await _kek_ids(redis, list(stored)) == {kek2.key_id}
    # A store given only the new KEK reads everything, byte for byte.
    assert await _read_all(redis, kek2, stored) == stored


async def test_running_it_twice_is_a_no_op(
    redis: Redis, kek1: KeyEncryptionKey, kek2: KeyEncryptionKey
) -> None:
    stored = await _store_vms(redis, kek1, 20)
    ring = KeyRing(kek2, [kek1])
    await rotate_data_keys(redis, ring)
    before = await redis.mget([data_key_key(vm_id) for vm_id in stored])

    again = await rotate_data_keys(redis, ring)

    assert again.scanned == 20
    assert again.rewrapped == 0
    assert again.already_current == 20
    assert await redis.mget([data_key_key(vm_id) for vm_id in stored]) == before


async def test_concurrent_rotation_from_two_replicas_rewraps_each_record_once(
    redis: Redis, private_redis: PrivateDatabase, kek1: KeyEncryptionKey, kek2: KeyEncryptionKey
) -> None:
    stored = await _store_vms(redis, kek1, VMS)
    replicas = [Redis.from_url(private_redis.url) for _ in range(3)]
    try:
        reports = await asyncio.gather(
            *(rotate_data_keys(client, KeyRing(kek2, [kek1])) for client in replicas)
        )
    finally:
        for client in replicas:
            await client.aclose()

    print(
        "rewrapped/raced/already current per replica: "
        + ", ".join(f"{r.rewrapped}/{r.raced}/{r.already_current}" for r in reports)
    )
    # Each record was replaced exactly once; the others saw it done.
    assert sum(report.rewrapped for report in reports) == VMS
    for report in reports:
        assert report.scanned == VMS
        assert report.rewrapped + report.raced + report.already_current == VMS
    assert await _kek_ids(redis, list(stored)) == {kek2.key_id}
    assert await _read_all(redis, kek2, stored) == stored


async def test_records_it_cannot_open_are_reported_and_left_alone(
    redis: Redis, kek1: KeyEncryptionKey, kek2: KeyEncryptionKey
) -> None:
    stored = await _store_vms(redis, kek1, 3)
    stranger = KeyEncryptionKey(os.urandom(32))
    foreign_vm, damaged_vm = str(uuid.uuid4()), str(uuid.uuid4())
    foreign = wrap_data_key(stranger, new_data_key()).to_bytes()
    damaged = WrappedKey(kek_id=kek1.key_id, wrapped=bytes(40)).to_bytes()
    await redis.set(data_key_key(foreign_vm), foreign)
    await redis.set(data_key_key(damaged_vm), damaged)

    report = await rotate_data_keys(redis, KeyRing(kek2, [kek1]))

    assert report.rewrapped == 3
    assert report.unknown_kek == {stranger.key_id: 1}
    assert report.damaged == [damaged_vm]
    assert not report.complete
    assert await redis.get(data_key_key(foreign_vm)) == foreign
    assert await redis.get(data_key_key(damaged_vm)) == damaged
    assert await _kek_ids(redis, list(stored)) == {kek2.key_id}


async def test_a_record_changed_between_read_and_write_is_not_overwritten(
    redis: Redis, kek1: KeyEncryptionKey, kek2: KeyEncryptionKey
) -> None:
    """The compare-and-set itself: a stale expected value does not replace the record."""
    vm_id = str(uuid.uuid4())
    original = wrap_data_key(kek1, new_data_key()).to_bytes()
    newer = wrap_data_key(kek2, new_data_key()).to_bytes()
    await redis.set(data_key_key(vm_id), newer)
    script = redis.register_script(key_rotation._COMPARE_AND_SET)

    assert await script(keys=[data_key_key(vm_id)], args=[original, b"x" * 49]) == 0
    assert await redis.get(data_key_key(vm_id)) == newer
    assert await script(keys=[data_key_key(vm_id)], args=[newer, original]) == 1
    assert await redis.get(data_key_key(vm_id)) == original
