"""Fixtures for the distributed engines: a three-node RabbitMQ cluster and a Redis primary
with a replica and three Sentinels, each the test's own (on free ports, in its temporary
directory) because the tests kill their members. Stopped whatever ended the test; no
service process the chaos harness started may outlive it either."""

from __future__ import annotations

import secrets
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from chaos.harness import kill_leftovers
from keeper_devtools.localstack import RabbitMQCluster, RedisSentinelGroup
from keeper_devtools.localstack.redis_users import RedisUsers
from keeper_devtools.tls import TlsFiles


@pytest.fixture
def rabbitmq_cluster(
    tmp_path: Path, local_servers_installed: None, tls_files: TlsFiles
) -> Iterator[RabbitMQCluster]:
    """Three private RabbitMQ nodes joined into one cluster, AMQP over TLS only."""
    # Node names share one epmd per machine, so each test's nodes get their own.
    cluster = RabbitMQCluster(
        tmp_path / "rabbitmq", prefix=f"keeper-c{secrets.token_hex(3)}", tls=tls_files
    )
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def redis_sentinel_group(
    tmp_path: Path, local_servers_installed: None, tls_files: TlsFiles, redis_users: RedisUsers
) -> Iterator[RedisSentinelGroup]:
    """A Redis primary, its replica and three Sentinels, AOF on, every link over TLS, the
    data nodes with the ACL users."""
    group = RedisSentinelGroup(tmp_path / "redis", tls=tls_files, users=redis_users)
    try:
        group.start()
        yield group
    finally:
        group.stop()


@pytest.fixture(autouse=True)
def no_process_outlives_the_test() -> Iterator[None]:
    """After each test, SIGKILL any service process group the harness did not reap."""
    yield
    left = kill_leftovers()
    if left:
        warnings.warn(f"killed leftover service process groups {left}", stacklevel=1)
