"""The state store's Redis schema (`StateRepository` + `persist.lua`) against a real Redis.

Invariant 2 (never older over newer) lives in one Lua script: a write is stored only from
the VM's placed host, under the placement's epoch, with a token strictly newer than the
head's; anything else is refused without touching a key. Invariant 8: the same content
again is a duplicate, not a new version. The property test drives random interleavings of
writes from three hosts and placement changes through the real repository.

Every test uses its own VM id (uuid4) and deletes that VM's keys: the server is shared.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest
import pytest_asyncio
from hypothesis import event, given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.exceptions import ResponseError

from keeper_devtools.localstack import RedisServer
from keeper_shared.messages.types import FencingToken, StateKind
from keeper_shared.redis_access.keys import (
    data_key_key,
    placement_key,
    state_blobs_key,
    state_head_key,
    state_history_key,
    state_meta_key,
)
from keeper_shared.redis_access.results import awaited
from keeper_state_store.crypto.encryption import (
    DecryptionError,
    KeyEncryptionKey,
    blob_associated_data,
    decrypt_blob,
    encrypt_blob,
)
from keeper_state_store.crypto.key_ring import KeyRing
from keeper_state_store.storage.durability import VolatileRedisError, ensure_durable
from keeper_state_store.storage.replication import NO_REPLICAS, run_replicated
from keeper_state_store.storage.repository import (
    StateRepository,
    VersionWrite,
    WriteOutcome,
    WriteResult,
)
from keeper_state_store.storage.version_reader import StoredVersion, VersionCopy, VersionReader

pytestmark = pytest.mark.redis

HISTORY_DEPTH = 3


@pytest_asyncio.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
def repository(redis: Redis, kek: KeyEncryptionKey) -> StateRepository:
    return StateRepository(redis, KeyRing(kek), history_depth=HISTORY_DEPTH)


async def _delete_vm_keys(redis: Redis, vm_id: str) -> None:
    keys = [key async for key in redis.scan_iter(match=f"keeper:{{{vm_id}}}:*")]
    if keys:
        await redis.delete(*keys)


@pytest_asyncio.fixture
async def vm_id(redis: Redis) -> AsyncIterator[str]:
    """A fresh VM, placed on host-a under epoch 1."""
    vm = str(uuid.uuid4())
    await _place(redis, vm, "host-a", 1)
    try:
        yield vm
    finally:
        await _delete_vm_keys(redis, vm)


async def _place(redis: Redis, vm_id: str, host: str, epoch: int) -> None:
    await awaited(redis.hset(placement_key(vm_id), mapping={"host": host, "epoch": epoch}))


async def _fetch(
    repository: StateRepository, vm_id: str, kind: StateKind, version: int
) -> StoredVersion | None:
    """A version as Redis holds it, unopened (what a store replica would then verify)."""
    return await VersionReader(repository.redis, repository.keys).fetch(vm_id, kind, version)


def _hash(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


def _version(
    vm_id: str,
    *,
    host: str = "host-a",
    epoch: int = 1,
    generation: int = 1,
    content: bytes = b"tpm state v1",
    kind: StateKind = StateKind.TPM,
) -> VersionWrite:
    return VersionWrite(
        vm_id=vm_id,
        kind=kind,
        host=host,
        token=FencingToken(epoch=epoch, generation=generation),
        content_hash=_hash(content),
        size=len(content),
        sealed=b"sealed:" + content,
    )


async def _head(redis: Redis, vm_id: str, kind: StateKind = StateKind.TPM) -> dict[bytes, bytes]:
    head: dict[bytes, bytes] = await awaited(redis.hgetall(state_head_key(vm_id, kind)))
    return head


async def test_first_write_is_stored_as_version_1(
    repository: StateRepository, redis: Redis, vm_id: str
) -> None:
    result = await repository.write_version(_version(vm_id, generation=7))

    assert result == WriteResult(WriteOutcome.STORED, "1")
    assert await repository.head_version(vm_id, StateKind.TPM) == 1
    assert await repository.head_hash(vm_id, StateKind.TPM) == _hash(b"tpm state v1")
    head = await _head(redis, vm_id)
    assert head[b"epoch"] == b"1"
    assert head[b"generation"] == b"7"
    # The other kind is independent and still empty.
    assert await repository.head_version(vm_id, StateKind.NVRAM) is None


async def test_same_hash_again_is_a_duplicate_and_changes_nothing(
    repository: StateRepository, redis: Redis, vm_id: str
) -> None:
    await repository.write_version(_version(vm_id, generation=1))
    before = await _head(redis, vm_id)

    # A redelivery (same token) and a later token with unchanged content alike.
    for generation in (1, 2):
        result = await repository.write_version(_version(vm_id, generation=generation))
        assert result == WriteResult(WriteOutcome.DUPLICATE, "1")

    assert await _head(redis, vm_id) == before
    assert await awaited(redis.lrange(state_history_key(vm_id, StateKind.TPM), 0, -1)) == [b"1"]


async def test_older_or_equal_generation_is_stale(
    repository: StateRepository, redis: Redis, vm_id: str
) -> None:
    await repository.write_version(_version(vm_id, generation=5, content=b"newest"))
    before = await _head(redis, vm_id)

    for generation in (4, 5):
        result = await repository.write_version(
            _version(vm_id, generation=generation, content=b"other")
        )
        assert result == WriteResult(WriteOutcome.STALE, "1")

    assert await _head(redis, vm_id) == before
    assert await _fetch(repository, vm_id, StateKind.TPM, 2) is None


async def test_older_epoch_is_stale_epoch(
    repository: StateRepository, redis: Redis, vm_id: str
) -> None:
    await _place(redis, vm_id, "host-a", 3)
    await repository.write_version(_version(vm_id, epoch=3, generation=1, content=b"epoch 3"))

    result = await repository.write_version(
        _version(vm_id, epoch=2, generation=99, content=b"epoch 2")
    )

    assert result == WriteResult(WriteOutcome.STALE_EPOCH, "3")
    assert await repository.head_hash(vm_id, StateKind.TPM) == _hash(b"epoch 3")


async def test_write_from_another_host_is_wrong_host(
    repository: StateRepository, redis: Redis, vm_id: str
) -> None:
    result = await repository.write_version(_version(vm_id, host="host-b", epoch=1, generation=1))

    assert result == WriteResult(WriteOutcome.WRONG_HOST, "host-a")
    assert await _head(redis, vm_id) == {}


async def test_write_for_a_vm_never_placed_is_refused(
    repository: StateRepository, redis: Redis
) -> None:
    vm = str(uuid.uuid4())
    try:
        result = await repository.write_version(_version(vm, epoch=0, generation=0))
        assert result == WriteResult(WriteOutcome.WRONG_HOST, "")
        assert await redis.exists(state_head_key(vm, StateKind.TPM)) == 0
    finally:
        await _delete_vm_keys(redis, vm)


async def test_new_placement_wins_and_the_old_host_is_fenced_off(
    repository: StateRepository, redis: Redis, vm_id: str
) -> None:
    assert (
        await repository.write_version(_version(vm_id, generation=50, content=b"on a"))
    ).outcome == "stored"

    # The VM is started on host-b under a new epoch; its generation starts again at 0.
    await _place(redis, vm_id, "host-b", 2)
    on_b = await repository.write_version(
        _version(vm_id, host="host-b", epoch=2, generation=0, content=b"on b")
    )
    assert on_b == WriteResult(WriteOutcome.STORED, "2")

    # host-a was declared lost and comes back with a write it made before the move.
    late = await repository.write_version(
        _version(vm_id, host="host-a", epoch=1, generation=51, content=b"late")
    )
    assert late == WriteResult(WriteOutcome.WRONG_HOST, "host-b")

    # Even once the VM returns to host-a, its old epoch stays fenced off.
    await _place(redis, vm_id, "host-a", 3)
    late = await repository.write_version(
        _version(vm_id, host="host-a", epoch=1, generation=52, content=b"late")
    )
    assert late == WriteResult(WriteOutcome.STALE_EPOCH, "3")
    assert await repository.head_hash(vm_id, StateKind.TPM) == _hash(b"on b")
    assert await repository.head_version(vm_id, StateKind.TPM) == 2


async def test_head_from_a_newer_epoch_wins_even_if_the_placement_goes_back(
    repository: StateRepository, redis: Redis, vm_id: str
) -> None:
    """Defence in depth: the head's own token is checked too, so a placement record that
    moved backwards (restored from a backup, a buggy writer) cannot let older over newer."""
    await _place(redis, vm_id, "host-a", 5)
    await repository.write_version(_version(vm_id, epoch=5, generation=0, content=b"epoch 5"))
    await _place(redis, vm_id, "host-a", 4)

    result = await repository.write_version(
        _version(vm_id, epoch=4, generation=99, content=b"epoch 4")
    )

    assert result == WriteResult(WriteOutcome.STALE, "1")
    assert await repository.head_hash(vm_id, StateKind.TPM) == _hash(b"epoch 5")


async def test_history_is_trimmed_to_its_depth(
    repository: StateRepository, redis: Redis, vm_id: str
) -> None:
    total = HISTORY_DEPTH + 2
    for generation in range(1, total + 1):
        result = await repository.write_version(
            _version(vm_id, generation=generation, content=f"v{generation}".encode())
        )
        assert result == WriteResult(WriteOutcome.STORED, str(generation))

    kept = [str(v).encode() for v in range(total - HISTORY_DEPTH + 1, total + 1)]
    assert await awaited(redis.lrange(state_history_key(vm_id, StateKind.TPM), 0, -1)) == kept
    assert sorted(await awaited(redis.hkeys(state_blobs_key(vm_id, StateKind.TPM)))) == kept
    assert sorted(await awaited(redis.hkeys(state_meta_key(vm_id, StateKind.TPM)))) == kept
    for version in range(1, total - HISTORY_DEPTH + 1):
        assert await _fetch(repository, vm_id, StateKind.TPM, version) is None
    newest = await _fetch(repository, vm_id, StateKind.TPM, total)
    assert newest is not None
    assert newest.copies[0].sealed == f"sealed:v{total}".encode()


async def test_read_version_returns_what_was_written(
    repository: StateRepository, redis: Redis, vm_id: str
) -> None:
    content = os.urandom(6000)
    content_hash = _hash(content)
    token = FencingToken(epoch=1, generation=4)
    data_key = await repository.data_key(vm_id)
    binding = blob_associated_data(vm_id, "tpm", token.epoch, token.generation, content_hash)
    sealed = encrypt_blob(data_key, content, binding)
    before = datetime.now(UTC)

    result = await repository.write_version(
        VersionWrite(
            vm_id=vm_id,
            kind=StateKind.TPM,
            host="host-a",
            token=token,
            content_hash=content_hash,
            size=len(content),
            sealed=sealed,
        )
    )
    assert result == WriteResult(WriteOutcome.STORED, "1")

    found = await _fetch(repository, vm_id, StateKind.TPM, 1)
    assert found is not None
    (copy,) = found.copies
    assert copy.where is VersionCopy.HISTORY
    record, sealed_back = found.record(), copy.sealed
    assert record is not None
    assert sealed_back == sealed
    assert record.version == 1
    assert record.content_hash == content_hash
    assert record.size == len(content)
    assert record.token == token
    assert record.host == "host-a"
    assert before - timedelta(seconds=1) <= record.stored_at <= datetime.now(UTC)
    assert decrypt_blob(await repository.data_key(vm_id), sealed_back, binding) == content
    assert await _fetch(repository, vm_id, StateKind.TPM, 2) is None
    assert await _fetch(repository, vm_id, StateKind.NVRAM, 1) is None


async def test_concurrent_data_key_creation_agrees_on_one_key(
    repository: StateRepository, redis_url: str, kek: KeyEncryptionKey, vm_id: str
) -> None:
    other_redis = Redis.from_url(redis_url)
    try:
        other = StateRepository(other_redis, KeyRing(kek), history_depth=HISTORY_DEPTH)
        # Two replicas, several requests each, all racing on a VM that has no key yet.
        keys = await asyncio.gather(
            *(repo.data_key(vm_id) for _ in range(4) for repo in (repository, other))
        )
        assert all(key == keys[0] for key in keys)
        assert await other.data_key(vm_id) == keys[0]
        # The key in Redis is wrapped: it is not the raw key material.
        wrapped = await other_redis.get(data_key_key(vm_id))
        assert wrapped is not None
        assert keys[0].material not in wrapped
    finally:
        await other_redis.aclose()


async def test_data_key_under_another_kek_is_refused(
    repository: StateRepository, redis: Redis, vm_id: str
) -> None:
    await repository.data_key(vm_id)
    stranger = StateRepository(redis, KeyRing(KeyEncryptionKey(os.urandom(32))), history_depth=1)
    with pytest.raises(DecryptionError):
        await stranger.data_key(vm_id)


# --- Property: random interleavings of three hosts and re-placements ---------------------

HOSTS = ("host-a", "host-b", "host-c")


@dataclass(frozen=True)
class Place:
    """Policy starts the VM on ``host``: the epoch goes up by one."""

    host: int


@dataclass(frozen=True)
class Write:
    """``host`` (the placed host when None) writes ``content`` with ``generation`` under
    its own last known epoch, or under ``epoch`` when given (a confused or replaying host)."""

    host: int | None
    epoch: int | None
    generation: int
    content: int


_host_index = st.integers(0, len(HOSTS) - 1)
_operations = st.lists(
    st.one_of(
        st.builds(Place, host=_host_index),
        st.builds(
            Write,
            # Mostly the placed host under its own epoch, so that writes get far enough
            # to be judged on their token, with enough strays to exercise the fencing.
            host=st.one_of(st.none(), st.none(), _host_index),
            epoch=st.one_of(st.none(), st.none(), st.integers(0, 6)),
            generation=st.integers(0, 6),
            content=st.integers(0, 4),
        ),
    ),
    min_size=1,
    max_size=40,
)


async def _run_interleaving(redis_url: str, operations: list[Place | Write]) -> None:
    vm = str(uuid.uuid4())
    kind = StateKind.NVRAM
    async with Redis.from_url(redis_url) as redis:
        repository = StateRepository(
            redis, KeyRing(KeyEncryptionKey(os.urandom(32))), history_depth=2
        )
        placement: tuple[str, int] | None = None
        known_epoch = dict.fromkeys(HOSTS, 0)
        head: tuple[int, int] | None = None  # (epoch, generation) as Redis holds it
        head_hash: str | None = None
        version = 0
        try:
            for operation in operations:
                if isinstance(operation, Place):
                    epoch = (placement[1] if placement else 0) + 1
                    host = HOSTS[operation.host]
                    await _place(redis, vm, host, epoch)
                    placement = (host, epoch)
                    known_epoch[host] = epoch
                    continue
                if operation.host is not None:
                    host = HOSTS[operation.host]
                elif placement is not None:
                    host = placement[0]
                else:
                    host = HOSTS[0]
                token = FencingToken(
                    epoch=known_epoch[host] if operation.epoch is None else operation.epoch,
                    generation=operation.generation,
                )
                content_hash = _hash(f"content {operation.content}".encode())
                result = await repository.write_version(
                    VersionWrite(
                        vm_id=vm,
                        kind=kind,
                        host=host,
                        token=token,
                        content_hash=content_hash,
                        size=1,
                        sealed=b"x",
                    )
                )
                event(f"outcome {result.outcome.value}")
                acceptable = (
                    placement == (host, token.epoch)
                    and (head is None or (token.epoch, token.generation) > head)
                    and content_hash != head_hash
                )
                # Accepted exactly when it came from the placed host, under the placement's
                # epoch, strictly newer than the head, and not the head's content again.
                assert (result.outcome is WriteOutcome.STORED) == acceptable, (result, token)
                stored = await _head(redis, vm, kind)
                new_head = (int(stored[b"epoch"]), int(stored[b"generation"])) if stored else None
                if acceptable:
                    version += 1
                    assert result.detail == str(version)
                    assert new_head == (token.epoch, token.generation)
                    head, head_hash = new_head, content_hash
                else:
                    # A refusal touches nothing; in particular the head never moves back.
                    assert new_head == head
                assert await repository.head_version(vm, kind) == (version or None)
                history = await awaited(redis.llen(state_history_key(vm, kind)))
                assert history == min(version, 2)
        finally:
            await _delete_vm_keys(redis, vm)


@settings(max_examples=50, deadline=None)
@given(first_host=_host_index, operations=_operations)
def test_fencing_holds_for_any_interleaving_of_hosts_and_placements(
    redis_url: str, first_host: int, operations: list[Place | Write]
) -> None:
    # A fresh event loop per example: hypothesis drives a synchronous test function. With
    # a loop_factory the runner leaves the current event loop alone; asyncio.run would
    # replace (and so leak, unclosed) the one pytest-asyncio keeps current between tests.
    with asyncio.Runner(loop_factory=asyncio.new_event_loop) as runner:
        runner.run(_run_interleaving(redis_url, [Place(first_host), *operations]))


# --- Durability check ------------------------------------------------------------------


async def test_durable_redis_is_accepted(redis: Redis) -> None:
    description = await ensure_durable(redis, allow_volatile=False)
    assert description.startswith("appendonly=yes ")


async def test_redis_without_append_only_file_is_refused_unless_allowed(
    private_redis_server: RedisServer,
) -> None:
    async with Redis.from_url(private_redis_server.url) as volatile:
        # The test's own server, never the shared one: turn its AOF off.
        await volatile.config_set("appendonly", "no")

        with pytest.raises(VolatileRedisError, match="appendonly=no"):
            await ensure_durable(volatile, allow_volatile=False)
        description = await ensure_durable(volatile, allow_volatile=True)
        assert description.startswith("appendonly=no ")


async def test_a_data_key_created_anew_is_used_not_a_remembered_one(
    repository: StateRepository, redis: Redis, vm_id: str
) -> None:
    first = await repository.data_key(vm_id)
    assert await repository.data_key(vm_id) == first
    # The VM's keys were removed; its next write creates a new data key.
    await redis.delete(data_key_key(vm_id))
    second = await repository.data_key(vm_id)
    assert second != first
    assert await repository.data_key(vm_id) == second


async def _script_exists_calls(redis: Redis) -> int:
    stats = await redis.info("commandstats")
    entry = stats.get("cmdstat_script|exists")
    return int(entry["calls"]) if entry else 0


@dataclass(frozen=True)
class WrittenOnce:
    """A repository on a Redis of the test's own, and a VM whose v1 was written (so the
    server has run the write script): for tests that read its stats or flush its scripts."""

    redis: Redis
    repository: StateRepository
    vm_id: str


@pytest_asyncio.fixture
async def written_once(
    private_redis_server: RedisServer, kek: KeyEncryptionKey
) -> AsyncIterator[WrittenOnce]:
    redis = Redis.from_url(private_redis_server.url)
    try:
        repository = StateRepository(redis, KeyRing(kek), history_depth=HISTORY_DEPTH)
        vm = str(uuid.uuid4())
        await _place(redis, vm, "host-a", 1)
        await repository.write_version(_version(vm, generation=1, content=b"v1"))
        yield WrittenOnce(redis, repository, vm)
    finally:
        await redis.aclose()


async def test_a_write_asks_no_script_exists_once_the_script_ran(
    written_once: WrittenOnce,
) -> None:
    # redis-py asks SCRIPT EXISTS before every pipeline holding a script: a round trip per
    # stored version that the repository skips for a script its server has already run.
    asked = await _script_exists_calls(written_once.redis)

    for generation in range(2, 6):
        result = await written_once.repository.write_version(
            _version(
                written_once.vm_id,
                generation=generation,
                content=b"v%d" % generation,
            )
        )
        assert result.outcome is WriteOutcome.STORED

    assert await _script_exists_calls(written_once.redis) == asked


async def test_a_write_after_the_server_forgot_its_scripts_is_stored_once(
    written_once: WrittenOnce,
) -> None:
    # A restart or a failover empties the script cache: the write that meets NOSCRIPT
    # loads the script and runs again, and is applied exactly once.
    await written_once.redis.script_flush()

    result = await written_once.repository.write_version(
        _version(written_once.vm_id, generation=2, content=b"v2")
    )

    assert result == WriteResult(WriteOutcome.STORED, "2")
    history = await awaited(
        written_once.redis.lrange(state_history_key(written_once.vm_id, StateKind.TPM), 0, -1)
    )
    assert history == [b"1", b"2"]


async def _history(redis: Redis, vm_id: str, kind: StateKind = StateKind.TPM) -> list[bytes]:
    history: list[bytes] = await awaited(redis.lrange(state_history_key(vm_id, kind), 0, -1))
    return history


async def test_a_batch_of_writes_is_fenced_write_by_write(
    written_once: WrittenOnce,
) -> None:
    # One pipeline for a fetched batch, but each write keeps its own fencing and outcome.
    redis, repository, placed = written_once.redis, written_once.repository, written_once.vm_id
    elsewhere = str(uuid.uuid4())
    await _place(redis, elsewhere, "host-b", 1)
    asked = await _script_exists_calls(redis)

    results = await repository.write_versions(
        [
            _version(placed, generation=2, content=b"v2"),
            _version(placed, kind=StateKind.NVRAM, content=b"vars v1"),
            _version(elsewhere, content=b"not from its host"),
            _version(placed, kind=StateKind.NVRAM, generation=0, content=b"older"),
        ]
    )

    assert results == [
        WriteResult(WriteOutcome.STORED, "2"),
        WriteResult(WriteOutcome.STORED, "1"),
        WriteResult(WriteOutcome.WRONG_HOST, "host-b"),
        WriteResult(WriteOutcome.STALE, "1"),
    ]
    assert await _history(redis, placed) == [b"1", b"2"]
    assert await _history(redis, placed, StateKind.NVRAM) == [b"1"]
    assert await _head(redis, elsewhere) == {}
    assert await _script_exists_calls(redis) == asked


async def test_a_batch_after_the_server_forgot_its_scripts_stores_each_write_once(
    written_once: WrittenOnce,
) -> None:
    redis, repository, placed = written_once.redis, written_once.repository, written_once.vm_id
    others = [str(uuid.uuid4()) for _ in range(3)]
    for vm in others:
        await _place(redis, vm, "host-a", 1)
    await redis.script_flush()

    results = await repository.write_versions(
        [
            _version(placed, generation=2, content=b"v2"),
            *(_version(vm, content=b"first of " + vm.encode()) for vm in others),
        ]
    )

    assert results == [
        WriteResult(WriteOutcome.STORED, "2"),
        *[WriteResult(WriteOutcome.STORED, "1")] * 3,
    ]
    assert await _history(redis, placed) == [b"1", b"2"]
    for vm in others:
        assert await _history(redis, vm) == [b"1"]


async def test_a_write_redis_fails_in_a_batch_fails_alone(
    repository: StateRepository, redis: Redis, vm_id: str
) -> None:
    damaged = str(uuid.uuid4())
    await _place(redis, damaged, "host-a", 1)
    await redis.set(state_head_key(damaged, StateKind.TPM), b"not a hash")
    try:
        results = await repository.write_versions(
            [_version(damaged), _version(vm_id), _version(vm_id, kind=StateKind.NVRAM)]
        )
    finally:
        await _delete_vm_keys(redis, damaged)

    assert isinstance(results[0], ResponseError)
    assert "WRONGTYPE" in str(results[0])
    assert results[1:] == [WriteResult(WriteOutcome.STORED, "1")] * 2


async def test_only_the_commands_that_met_noscript_run_again(
    private_redis_server: RedisServer,
) -> None:
    # A pipeline whose script met NOSCRIPT while its other commands ran: the script runs
    # again once loaded, the others do not (an INCR applied twice would show).
    redis = Redis.from_url(private_redis_server.url)
    try:
        script = redis.register_script("return redis.call('INCR', KEYS[1])")

        async def queue(pipe: Pipeline) -> None:
            pipe.incr("plain")
            await script(keys=["scripted"], client=pipe)
            pipe.incr("plain")

        assert await run_replicated(redis, NO_REPLICAS, queue) == [1, 1, 2]
        await redis.script_flush()
        assert await run_replicated(redis, NO_REPLICAS, queue) == [3, 2, 4]
        assert await redis.mget(["plain", "scripted"]) == [b"4", b"2"]
        # The cached script was trusted, met NOSCRIPT once and ran again.
        evalsha = (await redis.info("commandstats"))["cmdstat_evalsha"]
        assert (evalsha["calls"], evalsha["failed_calls"]) == (3, 1)
    finally:
        await redis.aclose()


async def test_new_vms_read_together_twice_at_once_get_one_key_each(
    repository: StateRepository, redis: Redis
) -> None:
    # Two replicas taking a storm's first versions of the same VMs: each VM's first SET NX
    # wins and both read its key back.
    vms = [str(uuid.uuid4()) for _ in range(20)]
    try:
        first, second = await asyncio.gather(repository.data_keys(vms), repository.data_keys(vms))

        assert first == second
        assert len({first[vm].material for vm in vms}) == len(vms)
        for vm in vms:
            assert await repository.data_key(vm) == first[vm]
    finally:
        for vm in vms:
            await _delete_vm_keys(redis, vm)


async def test_data_keys_of_many_vms_are_each_vms_own(
    repository: StateRepository, redis: Redis
) -> None:
    vms = [str(uuid.uuid4()) for _ in range(3)]
    try:
        known = await repository.data_key(vms[0])

        keys = await repository.data_keys(vms)

        assert keys[vms[0]] == known
        assert keys[vms[1]] != keys[vms[2]] != known != keys[vms[1]]
        for vm in vms:
            assert await repository.data_key(vm) == keys[vm]
    finally:
        for vm in vms:
            await _delete_vm_keys(redis, vm)
