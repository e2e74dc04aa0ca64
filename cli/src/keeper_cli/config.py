"""Where the CLI finds the bus: ``--amqp-url``, else ``KEEPER_AMQP_URL`` (or
``KEEPER_AMQP_URLS`` for a cluster), defaulting to the local stack (``make demo``): its
port, over TLS with its CA.
It asks policy and the store for everything it shows, so it needs no Redis address
(``KEEPER_REDIS_*`` variables left from earlier releases are ignored)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import yarl
from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from keeper_shared.bus.topology import POLICY, STATE_STORE
from keeper_shared.runtime.settings import split_list
from keeper_shared.sealing.keys import SEALING_PUBLIC_KEY_PATTERN

AMQP_URL_FORM = "amqp://USER:PASSWORD@HOST:PORT/ (or amqps://)"


def default_run_dir() -> Path:
    """``<repo root>/run/stack``, the repo root being the nearest directory (from the
    current one upwards) that holds ``deploy/local``; ``./run/stack`` outside a checkout."""
    cwd = Path.cwd()
    for candidate in (cwd, *cwd.parents):
        if (candidate / "deploy" / "local").is_dir():
            return candidate / "run" / "stack"
    return cwd / "run" / "stack"


class LocalStackPorts(BaseSettings):
    """Where the local stack (``make demo``) listens and keeps its files, from
    ``KEEPER_STACK_*`` variables: the CLI's default target. The development package's stack
    settings extend this class, so both read the same variables and defaults.

    The default ports differ from a system broker's (5672, 25672) and Redis's (6379), so
    the private servers run beside those, and lie below Linux's ephemeral range (32768 to
    60999), so no outgoing connection (nor rabbitmqctl's own 35672-35682) can hold one.
    """

    model_config = SettingsConfigDict(env_prefix="KEEPER_STACK_", frozen=True)

    rabbitmq_port: int = Field(default=28672, ge=1, le=65535)
    redis_port: int = Field(default=28379, ge=1, le=65535)
    run_dir: Path = Field(
        default_factory=default_run_dir,
        description="Where the stack keeps its files, its CA (tls/ca.pem) among them.",
    )


def _stack() -> LocalStackPorts:
    return LocalStackPorts()


def local_stack_url() -> str:
    """The local stack's broker as guest (allowed over loopback only), over TLS with the
    stack's own CA (``run/stack/tls/ca.pem``, made by ``deploy/local/stack start``)."""
    stack = _stack()
    ca = stack.run_dir / "tls" / "ca.pem"
    return f"amqps://guest:guest@127.0.0.1:{stack.rabbitmq_port}/?cafile={ca}"


def check_amqp_url(url: str) -> str:
    """``url`` when it is a broker URL the client can dial: amqp or amqps, with a host and
    a numeric port if one is given. The message never repeats the URL (it may hold a
    password)."""
    try:
        parsed = yarl.URL(url)  # a port that is not a number raises here
    except ValueError:
        raise ValueError(f"not an AMQP URL: expected {AMQP_URL_FORM}") from None
    if parsed.scheme not in ("amqp", "amqps"):
        raise ValueError(f"the scheme must be amqp or amqps: expected {AMQP_URL_FORM}")
    if not parsed.host:
        raise ValueError(f"no host in the URL: expected {AMQP_URL_FORM}")
    return url


class CliSettings(BaseSettings):
    """Settings of the ``keeper`` command, from ``KEEPER_*`` environment variables (the
    global options override them)."""

    model_config = SettingsConfigDict(env_prefix="KEEPER_", frozen=True, extra="ignore")

    amqp_url: str = Field(
        default_factory=local_stack_url,
        description="RabbitMQ URL (the local stack's by default); amqps:// for TLS with "
        "?cafile=CA-FILE (and certfile=, keyfile= for a client certificate).",
    )
    amqp_urls: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="A RabbitMQ cluster's node URLs (comma-separated); when set, amqp_url "
        "is not used.",
    )
    timeout_s: float = Field(
        default=120.0,
        gt=0,
        le=24 * 3600,
        description="How long a request waits for policy or the store.",
    )
    store_target: str = Field(
        default=STATE_STORE, description="The store's command key (tests point it elsewhere)."
    )
    store_sealing_key: str | None = Field(
        default=None,
        pattern=SEALING_PUBLIC_KEY_PATTERN,
        description="The store's sealing public key (base64, `python -m "
        "keeper_shared.sealing.keygen --public <store key file>`): export and import "
        "passphrases are sealed to it, and not sent without it.",
    )
    policy_target: str = Field(
        default=POLICY, description="Policy's command key (tests point it elsewhere)."
    )

    _split_amqp_urls = field_validator("amqp_urls", mode="before")(split_list)

    @field_validator("amqp_url")
    @classmethod
    def _dialable_url(cls, url: str) -> str:
        return check_amqp_url(url)

    @field_validator("amqp_urls")
    @classmethod
    def _dialable_urls(cls, urls: list[str]) -> list[str]:
        return [check_amqp_url(url) for url in urls]

    @property
    def amqp_endpoints(self) -> list[str]:
        """The broker URLs to try, in order: ``amqp_urls``, else ``amqp_url`` alone."""
        return list(self.amqp_urls) or [self.amqp_url]
