"""Fixtures for tests that need a real broker or Redis.

Each test session starts its own private RabbitMQ node and Redis server, on free ports and
in its own temporary directories, and stops them at the end even when tests fail, so it
never touches the demo stack or a system broker. Where a Docker engine answers, containers
are used instead. When the servers are not installed the tests skip, except under
``CI=true``, where a missing server is a failure: CI must not pass by skipping.
"""

from __future__ import annotations

import gc
import json
import os
import secrets
import warnings
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from hypothesis import HealthCheck, settings

from chaos.netns import MACHINE_NAME
from keeper_devtools.localstack import (
    NotInstalledError,
    RabbitMQConfig,
    RabbitMQNode,
    RedisConfig,
    RedisServer,
    free_tcp_ports,
)
from keeper_devtools.localstack.redis_cluster import RedisClusterGroup
from keeper_devtools.localstack.redis_users import RedisUsers
from keeper_devtools.tls import TlsFiles, make_tls_files
from keeper_state_store.crypto.encryption import KeyEncryptionKey, generate_key_file
from support import asyncapi_parser
from support.broker import Broker
from support.bus_clients import BusClients, ConnectBus
from support.deployed_redis import StartRedis, deployed_redis_servers
from support.redis_db import PrivateDatabase, private_database
from support.sealing_keys import key_file

# The machine runs real brokers and services beside the tests: on 2 busy cores a property
# test's data generation may be slow, which is no failure of the code under test.
settings.register_profile(
    "keeper", deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True
)
settings.load_profile("keeper")

_RABBITMQ_IMAGE = "rabbitmq:3.10"
_REDIS_IMAGE = "redis:7.0"


BROKER_KILLING_TESTS = (
    Path(__file__).parent / "chaos",
    Path(__file__).parent / "distributed",
    # Cancels channel RPCs mid-flight, after which the broker closes the connection.
    Path(__file__).parent / "integration" / "bus" / "test_dead_letter_watch.py",
)
"""Tests (directories, or one file) that restart, SIGKILL or cut off RabbitMQ under the test
process's own connections."""


def _kills_the_broker(path: Path) -> bool:
    """Whether the test file at ``path`` is one of `BROKER_KILLING_TESTS`."""
    return any(path.is_relative_to(killing) for killing in BROKER_KILLING_TESTS)


CUT_CONNECTION_WARNINGS = (
    "Exception ignored in. <socket.socket fd=[0-9]+, family=2, type=1, proto=6",
    "Exception ignored in. <function _SelectorTransport.__del__",
    "Exception ignored in. <function StreamWriter.__del__",
)
"""What aiormq leaves behind in the test process when the broker (node) dies under one of
its connections: its stream and transport are dropped without being closed, and Python
reports them when they are collected (seen in a few runs of the chaos and cluster tests,
on Python 3.11.2 and 3.11.7). Losing the broker under a connection is what those tests do,
so these three messages are ignored in `BROKER_KILLING_TESTS`, and only there; every
other warning still fails the test."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Ignore `CUT_CONNECTION_WARNINGS` in the tests that kill the broker."""
    for item in items:
        if _kills_the_broker(item.path):
            for message in CUT_CONNECTION_WARNINGS:
                item.add_marker(
                    pytest.mark.filterwarnings(
                        f"ignore:{message}:pytest.PytestUnraisableExceptionWarning"
                    )
                )


@pytest.fixture(scope="module", autouse=True)
def _collect_cut_connections(request: pytest.FixtureRequest) -> Iterator[None]:
    """Collect what aiormq left behind in a broker-killing module before its last test
    ends, while `CUT_CONNECTION_WARNINGS` are still ignored: collected later, by chance in
    another directory's test, the same warnings failed that test (a test_bus test after
    the distributed ones, once)."""
    yield
    if _kills_the_broker(request.path):
        for _ in range(3):  # a finalizer may free another cycle
            gc.collect()


def _require_installed(check_installed: Callable[[], None]) -> None:
    """Skip the test (fail it under CI) when ``check_installed`` finds a program missing."""
    try:
        check_installed()
    except NotInstalledError as error:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{error} (CI=true: tests must not skip because a server is missing)")
        pytest.skip(str(error))


def _docker_engine_answers() -> bool:
    """Tell whether a Docker engine answers a ping (the ``docker`` CLI alone is not enough)."""
    if "DOCKER_HOST" not in os.environ and not Path("/var/run/docker.sock").exists():
        return False
    import docker  # type: ignore[import-untyped]

    with warnings.catch_warnings():
        # docker-py leaves its socket open when the engine does not answer; it is collected
        # here so that its ResourceWarning cannot fail an unrelated test later.
        warnings.simplefilter("ignore", ResourceWarning)
        try:
            client = docker.from_env(timeout=3)
            try:
                return bool(client.ping())
            finally:
                client.close()
        except Exception:  # no engine, no permission, bad DOCKER_HOST: use local binaries
            return False
        finally:
            gc.collect()


def _rabbitmq_node(base_dir: Path, tls: TlsFiles) -> RabbitMQNode:
    amqp_port, dist_port, epmd_port = free_tcp_ports(3)
    # The node gets a port mapper of its own, which its stop stops: the machine's shared
    # one (4369) would outlive the tests.
    return RabbitMQNode(
        RabbitMQConfig(
            name=f"keeper-test-{amqp_port}",
            amqp_port=amqp_port,
            dist_port=dist_port,
            epmd_port=epmd_port,
            base_dir=base_dir,
            tls=tls,
        )
    )


def _redis_server(base_dir: Path, tls: TlsFiles, users: RedisUsers) -> RedisServer:
    (port,) = free_tcp_ports(1)
    return RedisServer(RedisConfig(port=port, base_dir=base_dir, tls=tls, users=users))


def _running_redis(
    directory: Path, tls_files: TlsFiles, redis_users: RedisUsers
) -> Iterator[RedisServer]:
    """A Redis server in ``directory`` (TLS, the ACL users), running until the generator
    is closed; stopped also when the test fails."""
    server = _redis_server(directory, tls_files, redis_users)
    _require_installed(server.check_installed)
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    """The session's throwaway CA with a server and a client certificate: every server the
    tests start takes TLS only and trusts this CA. The server certificate also names the
    machine as the chaos runs' agents in a network namespace dial it."""
    return make_tls_files(
        tmp_path_factory.mktemp("tls"), ca_name="keeper-test-ca", server_names=(MACHINE_NAME,)
    )


@pytest.fixture(scope="session")
def foreign_tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    """Another throwaway CA with its certificates, which no server of the session trusts
    (the wrong CA for a client, a client certificate a server must refuse)."""
    return make_tls_files(tmp_path_factory.mktemp("foreign-tls"), ca_name="keeper-foreign-ca")


@pytest.fixture(scope="session")
def redis_users(tmp_path_factory: pytest.TempPathFactory) -> RedisUsers:
    """The generated Redis ACL users with the session's passwords (``default`` is off on
    every Redis the tests start); ``redis_url`` is the admin's, services take their own."""
    return RedisUsers.ensure(tmp_path_factory.mktemp("redis-users"))


@pytest.fixture(scope="session")
def docker_engine() -> bool:
    """Whether this session runs its servers in Docker containers."""
    return _docker_engine_answers()


@pytest.fixture(scope="session")
def rabbitmq_broker(
    tmp_path_factory: pytest.TempPathFactory, docker_engine: bool, tls_files: TlsFiles
) -> Iterator[Broker]:
    """A RabbitMQ node private to this test session (quorum queues work), AMQP over TLS
    only (in a Docker container: plain AMQP)."""
    if docker_engine:
        from testcontainers.core.container import DockerContainer
        from testcontainers.core.waiting_utils import wait_for_logs

        # Not testcontainers' RabbitMqContainer: its readiness probe needs pika.
        with DockerContainer(_RABBITMQ_IMAGE).with_exposed_ports(5672) as container:
            wait_for_logs(container, "Server startup complete", timeout=120)

            def add_user_in_container(name: str, password: str) -> None:
                container.exec(["rabbitmqctl", "add_user", name, password])
                container.exec(["rabbitmqctl", "set_permissions", name, ".*", ".*", ".*"])

            def import_in_container(document: dict[str, Any]) -> None:
                for user in document.get("users", []):
                    container.exec(["rabbitmqctl", "delete_user", user["name"]])
                path = f"/tmp/definitions-{secrets.token_hex(8)}.json"
                text = json.dumps(document)
                container.exec(["sh", "-c", f"umask 077 && cat > {path} <<'EOF'\n{text}\nEOF"])
                container.exec(["rabbitmqctl", "import_definitions", path])
                container.exec(["rm", "-f", path])

            host = container.get_container_host_ip()
            url = f"amqp://guest:guest@{host}:{container.get_exposed_port(5672)}/"
            yield Broker(url, add_user_in_container, import_in_container)
        return
    node = _rabbitmq_node(tmp_path_factory.mktemp("rabbitmq"), tls_files)
    _require_installed(node.check_installed)

    def add_user(name: str, password: str) -> None:
        node.add_user(name, password)

    try:
        node.start()
        yield Broker(node.amqp_url, add_user, node.import_user_definitions)
    finally:
        node.stop()


@pytest.fixture(scope="session")
def rabbitmq_url(rabbitmq_broker: Broker) -> str:
    """AMQP URL (user guest) of the session's private RabbitMQ node."""
    return rabbitmq_broker.url


@pytest.fixture(scope="session")
def session_redis(
    tmp_path_factory: pytest.TempPathFactory, tls_files: TlsFiles, redis_users: RedisUsers
) -> Iterator[RedisServer]:
    """A Redis server private to this test session, AOF on with ``fsync always``, TLS only,
    the ACL users on (a local process; see ``redis_url`` for Docker)."""
    yield from _running_redis(tmp_path_factory.mktemp("redis"), tls_files, redis_users)


@pytest.fixture(scope="session")
def redis_url(request: pytest.FixtureRequest, docker_engine: bool) -> Iterator[str]:
    """URL of the session's Redis as its admin user (TLS, ``rediss``), AOF on with
    ``fsync always`` (in a Docker container: plain, no users)."""
    if docker_engine:
        from testcontainers.redis import RedisContainer

        container = RedisContainer(_REDIS_IMAGE).with_command(
            "redis-server --appendonly yes --appendfsync always"
        )
        with container:
            host = container.get_container_host_ip()
            yield f"redis://{host}:{container.get_exposed_port(container.port)}/0"
        return
    server: RedisServer = request.getfixturevalue("session_redis")
    yield server.url


@pytest.fixture
def private_redis_server(
    tmp_path: Path, tls_files: TlsFiles, redis_users: RedisUsers
) -> Iterator[RedisServer]:
    """A running Redis server of the test's own, for tests that kill and restart it (TLS
    and ACL users on, as the session's).

    Always a local process (never a container), because the test controls its lifetime.
    """
    yield from _running_redis(tmp_path / "redis", tls_files, redis_users)


@pytest.fixture
def private_redis_cluster(
    tmp_path: Path, tls_files: TlsFiles, redis_users: RedisUsers
) -> Iterator[RedisClusterGroup]:
    """A Redis Cluster of the test's own (three primaries, one replica each; TLS and the
    ACL users as on the session's Redis), stopped also when the test fails. A cluster that
    does not start fails the test; a missing redis-server skips it (fails under CI)."""
    _require_installed(RedisServer.check_installed)
    cluster = RedisClusterGroup.local(tmp_path / "redis-cluster", tls=tls_files, users=redis_users)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def start_deployed_redis(
    tmp_path: Path, tls_files: TlsFiles, redis_users: RedisUsers
) -> Iterator[StartRedis]:
    """Start Redis servers from the files in ``deploy/redis/`` (free ports, the test's
    directory, the session's certificates and ACL users installed beside them); always
    local processes, stopped after the test."""
    _require_installed(RedisServer.check_installed)
    with deployed_redis_servers(tmp_path / "deployed-redis", tls_files, redis_users) as start:
        yield start


@pytest.fixture
def local_servers_installed() -> None:
    """Skip (fail under CI) unless rabbitmq-server and redis-server are installed locally."""
    _require_installed(RabbitMQNode.check_installed)
    _require_installed(RedisServer.check_installed)


@pytest.fixture(scope="session")
def asyncapi_validator() -> Path:
    """The official AsyncAPI parser, installed (once per lockfile) where `asyncapi_parser.
    validate` runs it; skips without Node.js and npm (fails under CI)."""
    _require_installed(asyncapi_parser.check_installed)
    return asyncapi_parser.installed_validator()


@pytest_asyncio.fixture
async def connect_bus(rabbitmq_url: str) -> AsyncIterator[ConnectBus]:
    """``await connect_bus(source=..., origin=...)``: a bus client for a test that publishes,
    calls or consumes itself. Every client is closed when the test ends, before the fixtures
    the test asked for ahead of this one (a store whose queues a client consumes) stop."""
    clients = BusClients(rabbitmq_url)
    try:
        yield clients.connect
    finally:
        await clients.close_all()


@pytest_asyncio.fixture
async def private_redis(redis_url: str) -> AsyncIterator[PrivateDatabase]:
    """A database of the session's Redis that the test has to itself (emptied before and
    after), for tests that SCAN every key or run several clients against one database."""
    async with private_database(redis_url) as database:
        yield database


@pytest.fixture
def kek() -> KeyEncryptionKey:
    """A random key-encryption key of the test's own."""
    return KeyEncryptionKey(os.urandom(32))


@pytest.fixture
def kek_file(tmp_path: Path) -> Path:
    """A key-encryption key file of the test's own (mode 0600, as ``keeper`` writes it), for
    a store run as a process."""
    path = tmp_path / "kek.key"
    generate_key_file(path)
    return path


@pytest.fixture
def store_sealing_key_file(tmp_path: Path) -> Path:
    """The store's sealing private key file of the test's own (mode 0600), for a store run
    as a process (its hosts seal fetch replies to its public half)."""
    path = tmp_path / "store-sealing.key"
    key_file(path)
    return path
