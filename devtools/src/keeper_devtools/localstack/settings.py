"""Settings of the local stack: where it keeps its files and which ports it uses."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from keeper_cli.config import LocalStackPorts
from keeper_devtools.localstack.rabbitmq import RabbitMQConfig, RabbitMQNode
from keeper_devtools.localstack.redis import RedisConfig, RedisServer


def default_run_dir() -> Path:
    """``<repo root>/run/stack``, the repo root being the nearest directory (from the
    current one upwards) that holds ``deploy/local``; ``./run/stack`` outside a checkout."""
    cwd = Path.cwd()
    for candidate in (cwd, *cwd.parents):
        if (candidate / "deploy" / "local").is_dir():
            return candidate / "run" / "stack"
    return cwd / "run" / "stack"


class LocalStackSettings(LocalStackPorts):
    """The local stack's settings, read from ``KEEPER_STACK_*`` environment variables: its
    ports (shared with the CLI's defaults), directory and node name. When a port is taken,
    start says which, and these variables move the stack."""

    model_config = SettingsConfigDict(env_prefix="KEEPER_STACK_", frozen=True)

    run_dir: Path = Field(default_factory=default_run_dir)
    rabbitmq_dist_port: int = Field(default=28673, ge=1, le=65535)
    rabbitmq_epmd_port: int = Field(
        default=28674,
        ge=1,
        le=65535,
        description="The stack's own Erlang port mapper, started with its node and stopped "
        "with it; a system RabbitMQ keeps the shared one (4369) to itself.",
    )
    rabbitmq_node_name: str = Field(default="keeper", pattern=r"^[A-Za-z0-9_-]+$")

    def rabbitmq_node(self) -> RabbitMQNode:
        """The stack's RabbitMQ node (in ``<run_dir>/rabbitmq``), not started."""
        return RabbitMQNode(
            RabbitMQConfig(
                name=self.rabbitmq_node_name,
                amqp_port=self.rabbitmq_port,
                dist_port=self.rabbitmq_dist_port,
                base_dir=self.run_dir / "rabbitmq",
                epmd_port=self.rabbitmq_epmd_port,
            )
        )

    def redis_server(self) -> RedisServer:
        """The stack's Redis server (in ``<run_dir>/redis``), not started."""
        return RedisServer(RedisConfig(port=self.redis_port, base_dir=self.run_dir / "redis"))
