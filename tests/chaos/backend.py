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

from keeper_shared.contract.rabbitmq import host_definitions
from keeper_shared.localstack import LocalStackError, RabbitMQNode, RedisServer


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

    def add_host_user(self, host_id: str, password: str) -> None:
        """Give a host its own RabbitMQ user, permissions and command queue (what
        ``python -m keeper_shared.contract.rabbitmq host HOST`` generates)."""
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

    def add_host_user(self, host_id: str, password: str) -> None:
        """Import the host's definitions into the node."""
        with tempfile.TemporaryDirectory() as directory:
            path = Path(directory) / "host.json"
            path.write_text(json.dumps(host_definitions(host_id, password)), encoding="utf-8")
            result = self.node.ctl("import_definitions", str(path))
        if result is None or result.returncode != 0:
            said = "timed out" if result is None else (result.stdout + result.stderr)[-500:]
            raise LocalStackError(f"importing the definitions of {host_id} failed: {said}")

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
