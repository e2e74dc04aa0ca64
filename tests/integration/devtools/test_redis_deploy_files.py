"""The Redis files in ``deploy/redis/`` work as shipped, TLS only with the generated ACL
users, and those users let each service do exactly its work: real servers started from
those files (port and directory set on the command line, the certificates and users file
installed where the files expect them), the real store repository and policy registries
as those users."""

from __future__ import annotations

import asyncio
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any, cast

import pytest
import redis
import yarl
from redis.asyncio import Redis
from redis.backoff import NoBackoff
from redis.exceptions import (
    AuthenticationError,
    NoPermissionError,
    ReadOnlyError,
    ResponseError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.retry import Retry

from keeper_devtools.localstack import RedisServer, free_tcp_ports
from keeper_devtools.localstack.redis_cluster import RedisClusterGroup
from keeper_policy.hosts.registry import HostRegistry
from keeper_policy.storage.keys import workflow_key
from keeper_policy.storage.scripts import PolicyScripts
from keeper_policy.storage.vm_registry import PolicyRegistry
from keeper_policy.workflows.store import WorkflowStore
from keeper_shared.messages.tpm import VmSpec
from keeper_shared.messages.types import FencingToken, StateKind
from keeper_shared.redis_access.connection import RedisSettings, connect_redis
from keeper_shared.redis_access.keys import data_key_key, placement_key, state_head_key
from keeper_shared.redis_access.results import awaited
from keeper_state_store.crypto.encryption import KeyEncryptionKey
from keeper_state_store.crypto.key_ring import KeyRing
from keeper_state_store.storage.durability import ensure_durable
from keeper_state_store.storage.replication import NotReplicatedError, ReplicaQuorum
from keeper_state_store.storage.repository import StateRepository, VersionWrite, WriteOutcome
from support.deployed_redis import StartRedis

pytestmark = pytest.mark.redis

REPLICA_SYNC_TIMEOUT_S = 30.0


@contextmanager
def _client(server: RedisServer, url: str | None = None) -> Iterator[redis.Redis]:
    """The admin's client over TLS (or one from ``url``)."""
    # No retries: a refused login is the answer, not a reason to try again.
    with redis.Redis.from_url(
        url or server.url, decode_responses=True, socket_timeout=10, retry=Retry(NoBackoff(), 0)
    ) as client:
        yield client


def test_a_single_node_from_redis_conf_accepts_writes_and_keeps_each_one(
    start_deployed_redis: StartRedis,
) -> None:
    server = start_deployed_redis("redis.conf")
    with _client(server) as client:
        assert client.set("keeper:probe", "written")
        assert client.get("keeper:probe") == "written"
        config = cast(dict[str, str], client.config_get("*"))
    assert config["appendonly"] == "yes"
    assert config["appendfsync"] == "always"
    assert config["maxmemory-policy"] == "noeviction"
    assert config["min-replicas-to-write"] == "0"
    # TLS only (the test moved the TLS port; the plain one stays off), replication too.
    assert config["port"] == "0"
    assert config["tls-port"] == str(server.config.port)
    assert config["tls-replication"] == "yes"
    assert config["tls-auth-clients"] == "optional"
    plain = yarl.URL(server.url).with_scheme("redis").with_query(None)
    with _client(server, str(plain)) as client, pytest.raises(RedisConnectionError):
        client.ping()


def _info(client: redis.Redis, section: str) -> dict[str, Any]:
    return cast(dict[str, Any], client.info(section))


def _wait_for_online_replica(primary: redis.Redis) -> None:
    deadline = time.monotonic() + REPLICA_SYNC_TIMEOUT_S
    while _info(primary, "replication").get("slave0", {}).get("state") != "online":
        assert time.monotonic() < deadline, "the replica never came online"
        time.sleep(0.1)


def test_a_primary_from_replicated_conf_writes_only_while_a_replica_holds_on(
    start_deployed_redis: StartRedis,
) -> None:
    primary = start_deployed_redis("replicated.conf")
    with _client(primary) as client:
        with pytest.raises(ResponseError, match="NOREPLICAS"):
            client.set("keeper:probe", "alone")

        replica = start_deployed_redis("replicated.conf", replica_of=primary.config.port)
        _wait_for_online_replica(client)
        assert client.set("keeper:probe", "replicated")
        assert client.wait(1, 10_000) == 1
        assert client.config_get("appendfsync") == {"appendfsync": "always"}

    with _client(replica) as copy:
        assert copy.get("keeper:probe") == "replicated"
        with pytest.raises(ReadOnlyError):
            copy.set("keeper:probe", "on the replica")
        # A replica ignores SIGTERM while it writes the AOF of its first copy ("can't
        # exit"): let it finish, so stopping it takes no longer than it should.
        _wait_for_aof_written(copy)


def _wait_for_aof_written(client: redis.Redis) -> None:
    deadline = time.monotonic() + REPLICA_SYNC_TIMEOUT_S
    while True:
        persistence = _info(client, "persistence")
        if not (persistence["aof_rewrite_in_progress"] or persistence["aof_rewrite_scheduled"]):
            return
        assert time.monotonic() < deadline, "the replica never finished its AOF"
        time.sleep(0.1)


@pytest.fixture
def acl_server(start_deployed_redis: StartRedis) -> RedisServer:
    """A single node from redis.conf, whose users.acl holds the generated users."""
    return start_deployed_redis("redis.conf")


@asynccontextmanager
async def _as_user(server: RedisServer, name: str) -> AsyncIterator[Redis]:
    """A client made as the service makes it: from a URL carrying user and password."""
    users = server.config.users
    assert users is not None, "deployed servers have the session's users"
    client = connect_redis(RedisSettings(redis_url=server.url_for(*users.login(name))))
    try:
        yield client
    finally:
        await client.aclose()


def _version(vm_id: str, *, epoch: int, content: bytes) -> VersionWrite:
    return VersionWrite(
        vm_id=vm_id,
        kind=StateKind.TPM,
        host="hv-1",
        token=FencingToken(epoch=epoch, generation=1),
        content_hash=secrets.token_hex(32),
        size=len(content),
        sealed=b"sealed:" + content,
    )


async def test_policy_and_store_users_do_their_work_and_nothing_else(
    acl_server: RedisServer, kek: KeyEncryptionKey
) -> None:
    vm_id = str(uuid.uuid4())
    async with _as_user(acl_server, "keeper-policy") as policy_redis:
        scripts = PolicyScripts(policy_redis)
        registry = PolicyRegistry(policy_redis, scripts)
        await registry.register_vm(VmSpec(vm_id=vm_id, name="win-01", guest_os="windows-11"), "")
        assert await registry.names.index_existing() == 1
        assert await registry.names.claim("win-01", "other", exclusive=True) == [vm_id]
        epoch = await registry.place(vm_id, "hv-1", expected_host=None)
        assert await registry.vms_on("hv-1") == [vm_id]
        hosts = HostRegistry(policy_redis, scripts)
        await hosts.add_cleanup("hv-2", [vm_id])
        assert await hosts.cleanup_set("hv-2") == {vm_id}
        await hosts.drop_cleanup("hv-2", [vm_id])
        workflows = WorkflowStore(policy_redis, scripts)
        assert await workflows.acquire(vm_id, "policy-1", 30.0)
        await workflows.release(vm_id, "policy-1")

        async with _as_user(acl_server, "keeper-store") as store_redis:
            assert "appendonly=yes" in await ensure_durable(store_redis, allow_volatile=False)
            repository = StateRepository(store_redis, KeyRing(kek), history_depth=3)
            written = await repository.write_version(_version(vm_id, epoch=epoch, content=b"v1"))
            assert written.outcome is WriteOutcome.STORED
            assert await repository.head_version(vm_id, StateKind.TPM) == 1
            await repository.data_key(vm_id)
            # WAIT and the barrier it bumps are allowed: too few replicas, not NOPERM.
            waiting = StateRepository(
                store_redis, KeyRing(kek), history_depth=3, replicas=ReplicaQuorum(1, 100)
            )
            with pytest.raises(NotReplicatedError):
                await waiting.write_version(_version(vm_id, epoch=epoch, content=b"v2"))

            # The store may read the placement, never move a VM, nor touch policy's keys.
            for refused in (
                store_redis.hset(placement_key(vm_id), "host", "hv-evil"),
                store_redis.get(workflow_key(vm_id)),
                store_redis.set("elsewhere:key", "x"),
                store_redis.flushall(),
                store_redis.config_set("appendonly", "no"),
                store_redis.keys("*"),
            ):
                with pytest.raises(NoPermissionError):
                    await awaited(refused)

        await registry.note_persisted(vm_id, StateKind.TPM, 1, time.time())
        assert (await registry.vm(vm_id)).versions == {StateKind.TPM: 1}
        # Policy never reads a data key or stored state, nor reconfigures Redis.
        for refused in (
            policy_redis.get(data_key_key(vm_id)),
            policy_redis.hgetall(state_head_key(vm_id, StateKind.TPM)),
            policy_redis.flushall(),
            policy_redis.config_get("*"),
            policy_redis.wait(0, 0),
        ):
            with pytest.raises(NoPermissionError):
                await awaited(refused)


def test_the_default_user_cannot_log_in(acl_server: RedisServer) -> None:
    with _client(acl_server, acl_server.url_for(None, None)) as anonymous:
        with pytest.raises(AuthenticationError):
            anonymous.ping()
        with pytest.raises(AuthenticationError):
            anonymous.execute_command("AUTH", "default", "")  # type: ignore[no-untyped-call]


async def test_a_restart_keeps_the_services_transactions(acl_server: RedisServer) -> None:
    """Policy's placement (a Lua script writing several keys, logged as MULTI/EXEC) and a
    transaction survive a SIGKILL: Redis 7.0 replays the append-only file as ``default``
    and dropped every such write while ``default`` had no permissions."""
    vm_id = str(uuid.uuid4())
    async with _as_user(acl_server, "keeper-policy") as policy_redis:
        registry = PolicyRegistry(policy_redis, PolicyScripts(policy_redis))
        await registry.register_vm(VmSpec(vm_id=vm_id, name="win-02", guest_os="windows-11"), "")
        epoch = await registry.place(vm_id, "hv-1", expected_host=None)
        async with policy_redis.pipeline(transaction=True) as pipe:
            pipe.hset(workflow_key(vm_id), "step", "one")
            pipe.hset(workflow_key(vm_id), "owner", "policy-1")
            await pipe.execute()

    await asyncio.to_thread(acl_server.kill)
    await asyncio.to_thread(acl_server.start)

    async with _as_user(acl_server, "keeper-policy") as policy_redis:
        placement = await awaited(policy_redis.hgetall(placement_key(vm_id)))
        assert placement[b"host"] == b"hv-1"
        assert int(placement[b"epoch"]) == epoch
        workflow = await awaited(policy_redis.hgetall(workflow_key(vm_id)))
        assert workflow == {b"step": b"one", b"owner": b"policy-1"}
    assert "NOPERM" not in acl_server.log_file.read_text(encoding="utf-8")


async def test_six_nodes_from_cluster_conf_serve_policy_and_the_store(
    start_deployed_redis: StartRedis, kek: KeyEncryptionKey
) -> None:
    """cluster.conf as shipped (only each node's cluster bus port on the command line):
    the nodes form a cluster of three shards with a replica each, and policy's registries
    and the store's fenced writes (waiting for the shard's replica) work on it as their
    own users."""
    bus_ports = free_tcp_ports(6)
    servers = [
        start_deployed_redis("cluster.conf", extra_args=("--cluster-port", str(port)))
        for port in bus_ports
    ]
    users = servers[0].config.users
    assert users is not None
    cluster = RedisClusterGroup(
        servers,
        {server.config.port: port for server, port in zip(servers, bus_ports, strict=True)},
        tls=servers[0].config.tls,
        users=users,
    )
    cluster.start()

    def as_user(name: str) -> Redis:
        return connect_redis(
            RedisSettings(
                redis_url=servers[0].url_for(*users.login(name)),
                redis_cluster_nodes=cluster.startup_nodes,
            )
        )

    vm_id = str(uuid.uuid4())
    policy_redis, store_redis = as_user("keeper-policy"), as_user("keeper-store")
    try:
        scripts = PolicyScripts(policy_redis)
        registry = PolicyRegistry(policy_redis, scripts)
        await registry.register_vm(VmSpec(vm_id=vm_id, name="win-01", guest_os="windows-11"), "")
        epoch = await registry.place(vm_id, "hv-1", expected_host=None)
        assert await registry.vms_on("hv-1") == [vm_id]
        workflows = WorkflowStore(policy_redis, scripts)
        assert await workflows.acquire(vm_id, "policy-1", 30.0)
        await workflows.release(vm_id, "policy-1")

        assert await ensure_durable(store_redis, allow_volatile=False) == (
            "appendonly=yes appendfsync=always (6 nodes)"
        )
        repository = StateRepository(
            store_redis, KeyRing(kek), history_depth=3, replicas=ReplicaQuorum(1, 2000)
        )
        written = await repository.write_version(_version(vm_id, epoch=epoch, content=b"v1"))
        assert written.outcome is WriteOutcome.STORED
        assert await repository.head_version(vm_id, StateKind.TPM) == 1
    finally:
        await policy_redis.aclose()
        await store_redis.aclose()
