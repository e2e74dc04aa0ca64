"""The broker and Redis a chaos run runs against, with the faults only they can suffer.

The runner takes any `ChaosBackend`: `LocalBackend` is one private RabbitMQ node and one
private Redis server; a cluster variant (three RabbitMQ nodes, Sentinel-managed Redis)
plugs in by offering the same URLs and operations, and prints the same table.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from chaos.engine_cluster import Engines
from keeper_devtools.contract.rabbitmq import host_definitions
from keeper_devtools.localstack import (
    LocalStackError,
    RabbitMQCluster,
    RabbitMQNode,
    RedisSentinelGroup,
    RedisServer,
)

FAILOVER_TIMEOUT_S = 90.0
"""Generous: a Sentinel failover takes ~3 s, an old primary back as replica ~11 s."""


class ChaosBackend(Protocol):
    """What a chaos run needs from the servers under it. Operations block (run them in a
    thread) and return only once the server is in the state they name."""

    name: str
    """Shown in the table's title."""

    @property
    def amqp_url(self) -> str:
        """The URL every service and the harness connect to (user guest)."""
        ...

    @property
    def redis_url(self) -> str:
        """The URL of the Redis the store and policy use."""
        ...

    @property
    def engines(self) -> Engines:
        """How services reach the servers beyond ``amqp_url`` and ``redis_url`` (several
        broker nodes, Sentinels); empty for a single node and server."""
        ...

    def add_host_user(self, host_id: str, password: str) -> None:
        """Give a host its own RabbitMQ user, permissions and command queue (what
        ``python -m keeper_devtools.contract.rabbitmq host HOST`` generates)."""
        ...

    def restart_broker(self) -> None:
        """Stop the broker (or one node of it) and start it again."""
        ...

    def kill_redis(self) -> None:
        """SIGKILL Redis (or its primary), as a crash would."""
        ...

    def start_redis(self) -> None:
        """Bring Redis back after `kill_redis`, from what it had persisted."""
        ...

    def server_logs(self) -> list[Path]:
        """Every log file or directory the servers wrote, for the leak scan."""
        ...


@dataclass
class LocalBackend:
    """One private RabbitMQ node and one private Redis server, both already started."""

    node: RabbitMQNode
    redis: RedisServer
    name: str = "one RabbitMQ node, one Redis"

    @property
    def amqp_url(self) -> str:
        """The node's URL."""
        return self.node.amqp_url

    @property
    def redis_url(self) -> str:
        """The server's URL."""
        return self.redis.url

    @property
    def engines(self) -> Engines:
        """Nothing beyond the two URLs."""
        return Engines()

    def add_host_user(self, host_id: str, password: str) -> None:
        """Import the host's definitions into the node."""
        _import_host_definitions(self.node, host_id, password)

    def restart_broker(self) -> None:
        """A clean stop (``rabbitmqctl stop``) and a start from the same directory."""
        self.node.stop()
        self.node.start()

    def kill_redis(self) -> None:
        """SIGKILL; the append-only file keeps every acknowledged write."""
        self.redis.kill()

    def start_redis(self) -> None:
        """Start from the same directory (the AOF is replayed)."""
        self.redis.start()

    def server_logs(self) -> list[Path]:
        """The node's log directory and the Redis log."""
        return [self.node.log_file.parent, self.redis.log_file]


@dataclass
class DistributedBackend:
    """Three RabbitMQ nodes in one cluster and a Redis primary with a replica and three
    Sentinels, all started. Services connect to every node (the second first, so a node
    restart moves them) and follow the Sentinels; the store waits for one replica."""

    cluster: RabbitMQCluster
    redis: RedisSentinelGroup
    name: str = "a 3-node RabbitMQ cluster, Redis primary + replica + 3 Sentinels"
    _restarts: int = 0
    _killed_primary: RedisServer | None = None

    @property
    def amqp_url(self) -> str:
        """The first node: the harness's own connections, never the node restarted."""
        return self.cluster.nodes[0].amqp_url

    @property
    def redis_url(self) -> str:
        """The primary at the start (the services and the harness follow the Sentinels)."""
        return self.redis.primary().url

    @property
    def engines(self) -> Engines:
        """Every node, the restarted ones first; the Sentinels; one replica per write."""
        urls = self.cluster.amqp_urls
        return Engines(
            amqp_urls=[*urls[1:], urls[0]],
            redis_sentinels=self.redis.sentinel_addresses,
            redis_master_name=self.redis.master_name,
            redis_sentinel_password=self.redis.sentinel_password,
            store_min_replicas=1,
        )

    def add_host_user(self, host_id: str, password: str) -> None:
        """Import the host's definitions into the first node (users are cluster-wide)."""
        _import_host_definitions(self.cluster.nodes[0], host_id, password)

    def restart_broker(self) -> None:
        """SIGKILL the second or third node (in turn) and start it again: it rejoins."""
        node = self.cluster.nodes[1 + self._restarts % (len(self.cluster.nodes) - 1)]
        self._restarts += 1
        node.kill()
        node.start()

    def kill_redis(self) -> None:
        """SIGKILL the primary and wait until the Sentinels promoted the replica."""
        self._killed_primary = self.redis.kill_primary()
        self.redis.wait_for_failover(self._killed_primary, FAILOVER_TIMEOUT_S)

    def start_redis(self) -> None:
        """Start the old primary again and wait until it is the new primary's replica."""
        if self._killed_primary is not None:
            self._killed_primary.start()
            self._killed_primary = None
        self.redis.wait_for_replica(FAILOVER_TIMEOUT_S)

    def server_logs(self) -> list[Path]:
        """Every node's log directory, every Redis server's and Sentinel's log."""
        return [
            *(node.log_file.parent for node in self.cluster.nodes),
            *(server.log_file for server in self.redis.servers),
            *(sentinel.log_file for sentinel in self.redis.sentinels),
        ]


def _import_host_definitions(node: RabbitMQNode, host_id: str, password: str) -> None:
    """Give a host its user, permissions and command queue on ``node``."""
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "host.json"
        path.write_text(json.dumps(host_definitions(host_id, password)), encoding="utf-8")
        result = node.ctl("import_definitions", str(path))
    if result is None or result.returncode != 0:
        said = "timed out" if result is None else (result.stdout + result.stderr)[-500:]
        raise LocalStackError(f"importing the definitions of {host_id} failed: {said}")
