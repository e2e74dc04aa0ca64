"""Chaos tests start many processes (none may outlive its test, whatever ended it) and
servers of their own."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from chaos.backend import LocalBackend
from chaos.harness import kill_leftovers
from keeper_devtools.localstack import (
    RabbitMQConfig,
    RabbitMQNode,
    RedisConfig,
    RedisServer,
    free_tcp_ports,
)
from keeper_devtools.localstack.redis_users import RedisUsers
from keeper_devtools.tls import TlsFiles


@pytest.fixture(autouse=True)
def no_process_outlives_the_test() -> Iterator[None]:
    """After each test, SIGKILL any service process group the harness did not reap (a test
    cut short by a timeout never reaches its own cleanup)."""
    yield
    left = kill_leftovers()
    if left:
        warnings.warn(f"killed leftover service process groups {left}", stacklevel=1)


@pytest.fixture
def local_chaos_backend(
    tmp_path: Path, local_servers_installed: None, tls_files: TlsFiles, redis_users: RedisUsers
) -> Iterator[LocalBackend]:
    """A RabbitMQ node and a Redis server of the test's own (a chaos run restarts and kills
    them), TLS only with the session's CA and Redis's ACL users, stopped at the end
    whatever happened."""
    amqp_port, dist_port, epmd_port, redis_port = free_tcp_ports(4)
    node = RabbitMQNode(
        RabbitMQConfig(
            name=f"keeper-chaos-{amqp_port}",
            amqp_port=amqp_port,
            dist_port=dist_port,
            epmd_port=epmd_port,
            base_dir=tmp_path / "rabbitmq",
            tls=tls_files,
        )
    )
    redis = RedisServer(
        RedisConfig(port=redis_port, base_dir=tmp_path / "redis", tls=tls_files, users=redis_users)
    )
    try:
        node.start()
        redis.start()
        yield LocalBackend(node, redis)
    finally:
        redis.stop()
        node.stop()
