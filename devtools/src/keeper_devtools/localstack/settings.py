"""Settings of the local stack: where it keeps its files and which ports it uses."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from keeper_cli.config import LocalStackPorts
from keeper_devtools.localstack.rabbitmq import RabbitMQConfig, RabbitMQNode
from keeper_devtools.localstack.redis import RedisConfig, RedisServer
from keeper_devtools.localstack.redis_users import RedisUsers
from keeper_devtools.tls import TlsFiles, ensure_tls_files


class LocalStackSettings(LocalStackPorts):
    """The local stack's settings, read from ``KEEPER_STACK_*`` environment variables: its
    ports (shared with the CLI's defaults), directory and node name. When a port is taken,
    start says which, and these variables move the stack.

    The stack's links are TLS only, with its own throwaway CA in ``<run_dir>/tls``, and
    Redis has the generated ACL users, their passwords in ``<run_dir>/redis-users``."""

    model_config = SettingsConfigDict(env_prefix="KEEPER_STACK_", frozen=True)

    rabbitmq_dist_port: int = Field(default=28673, ge=1, le=65535)
    rabbitmq_epmd_port: int = Field(
        default=28674,
        ge=1,
        le=65535,
        description="The stack's own Erlang port mapper, started with its node and stopped "
        "with it; a system RabbitMQ keeps the shared one (4369) to itself.",
    )
    rabbitmq_node_name: str = Field(default="keeper", pattern=r"^[A-Za-z0-9_-]+$")

    @property
    def tls(self) -> TlsFiles:
        """The stack's certificates (made by `prepare`)."""
        return TlsFiles(self.run_dir / "tls")

    @property
    def redis_users(self) -> RedisUsers:
        """The stack's Redis users (made by `prepare`)."""
        return RedisUsers(self.run_dir / "redis-users")

    def prepare(self) -> None:
        """Make the certificates (again, when they are about to expire) and the Redis users'
        passwords that are missing; before every start."""
        ensure_tls_files(self.tls.directory)
        RedisUsers.ensure(self.redis_users.directory)

    def rabbitmq_node(self) -> RabbitMQNode:
        """The stack's RabbitMQ node (in ``<run_dir>/rabbitmq``), not started."""
        return RabbitMQNode(
            RabbitMQConfig(
                name=self.rabbitmq_node_name,
                amqp_port=self.rabbitmq_port,
                dist_port=self.rabbitmq_dist_port,
                base_dir=self.run_dir / "rabbitmq",
                epmd_port=self.rabbitmq_epmd_port,
                tls=self.tls,
            )
        )

    def redis_server(self) -> RedisServer:
        """The stack's Redis server (in ``<run_dir>/redis``), not started."""
        return RedisServer(
            RedisConfig(
                port=self.redis_port,
                base_dir=self.run_dir / "redis",
                tls=self.tls,
                users=self.redis_users,
            )
        )

    def redis_url_for(self, user: str) -> str:
        """The stack's Redis URL as ``user`` (``keeper-store``, ``keeper-policy``…)."""
        return self.redis_server().url_for(*self.redis_users.login(user))
