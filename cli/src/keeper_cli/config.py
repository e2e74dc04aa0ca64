"""Where the CLI finds the bus and Redis: ``KEEPER_AMQP_URL`` (or ``KEEPER_AMQP_URLS`` for a
cluster) and ``KEEPER_REDIS_URL`` (or ``KEEPER_REDIS_SENTINELS``), defaulting to the local
stack's ports (``make demo``)."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from keeper_shared.bus.topology import STATE_STORE
from keeper_shared.redis_access.connection import RedisSettings
from keeper_shared.runtime.settings import split_list


class LocalStackPorts(BaseSettings):
    """Where the local stack (``make demo``) listens, from ``KEEPER_STACK_*`` variables: the
    CLI's default target. The development package's stack settings extend this class, so
    both read the same variables and defaults.

    The default ports differ from a system broker's (5672, 25672) and Redis's (6379), so
    the private servers run beside those, and lie below Linux's ephemeral range (32768 to
    60999), so no outgoing connection (nor rabbitmqctl's own 35672-35682) can hold one.
    """

    model_config = SettingsConfigDict(env_prefix="KEEPER_STACK_", frozen=True)

    rabbitmq_port: int = Field(default=28672, ge=1, le=65535)
    redis_port: int = Field(default=28379, ge=1, le=65535)


def _stack() -> LocalStackPorts:
    return LocalStackPorts()


class CliSettings(BaseSettings, RedisSettings):
    """Settings of the ``keeper`` command, from ``KEEPER_*`` environment variables."""

    model_config = SettingsConfigDict(env_prefix="KEEPER_", frozen=True, extra="ignore")

    amqp_url: str = Field(
        default_factory=lambda: f"amqp://guest:guest@127.0.0.1:{_stack().rabbitmq_port}/",
        description="RabbitMQ URL (the local stack's by default).",
    )
    amqp_urls: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="A RabbitMQ cluster's node URLs (comma-separated); when set, amqp_url "
        "is not used.",
    )
    redis_url: str = Field(
        default_factory=lambda: f"redis://127.0.0.1:{_stack().redis_port}/0",
        description="Redis URL, read for `status` and `hosts` (the local stack's by default).",
    )
    timeout_s: float = Field(
        default=120.0, gt=0, description="How long a request waits for policy or the store."
    )
    store_target: str = Field(
        default=STATE_STORE, description="The store's command key (tests point it elsewhere)."
    )
    host_lost_after_s: float = Field(
        default=30.0, gt=0, description="A host silent this long shows as `silent`."
    )

    _split_amqp_urls = field_validator("amqp_urls", mode="before")(split_list)

    @property
    def amqp_endpoints(self) -> list[str]:
        """The broker URLs to try, in order: ``amqp_urls``, else ``amqp_url`` alone."""
        return list(self.amqp_urls) or [self.amqp_url]
