"""One way to reach Redis for every component: a plain URL, or the primary that Redis
Sentinel names, followed through failovers."""

from __future__ import annotations

from typing import Annotated, Any

import yarl
from pydantic import BaseModel, Field, SecretStr, field_validator
from pydantic_settings import NoDecode
from redis.asyncio import Redis
from redis.asyncio.sentinel import Sentinel

from keeper_shared.runtime.settings import split_list

SENTINEL_TIMEOUT_S = 2.0
"""Bound on one question to a Sentinel, so a dead one is skipped quickly."""


class RedisSettings(BaseModel):
    """Where Redis is; mixed into the settings of each component that uses it, which read
    it from the environment under their own prefix (``KEEPER_STORE_REDIS_URL``,
    ``KEEPER_POLICY_REDIS_SENTINELS``, ``KEEPER_POLICY_REDIS_MASTER_NAME``…)."""

    redis_url: str = Field(
        default="redis://127.0.0.1:28379/0",
        description=(
            "Redis URL: redis://USER:PASSWORD@HOST:PORT/DB, or rediss:// for TLS with "
            "?ssl_ca_certs=CA-FILE (and ssl_certfile=, ssl_keyfile= for a client "
            "certificate). With redis_sentinels set, only its scheme, database number, user, "
            "password and TLS options are used: the address comes from the Sentinels, which "
            "are then reached over TLS too when the scheme is rediss."
        ),
    )
    redis_sentinels: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Sentinel addresses (host:port, comma-separated); empty: no Sentinel.",
    )
    redis_master_name: str = Field(
        default="keeper", description="The name the Sentinels monitor the primary under."
    )
    redis_sentinel_password: SecretStr | None = Field(
        default=None,
        description="The Sentinels' own password (requirepass in sentinel.conf); None: "
        "they take none.",
    )

    _split_sentinels = field_validator("redis_sentinels", mode="before")(split_list)

    @field_validator("redis_sentinels")
    @classmethod
    def _check_addresses(cls, addresses: list[str]) -> list[str]:
        for address in addresses:
            host, _, port = address.rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"a Sentinel address is host:port, not {address!r}")
        return addresses


class _SentinelFollowingRedis(Redis):
    """A client of the current primary that also closes its Sentinel connections."""

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        await super().aclose(close_connection_pool)
        sentinel_manager = getattr(self.connection_pool, "sentinel_manager", None)
        if isinstance(sentinel_manager, Sentinel):
            for sentinel in sentinel_manager.sentinels:
                await sentinel.aclose()


TLS_QUERY_OPTIONS = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs")
"""The TLS options a Redis URL may carry (redis-py reads the same from a plain URL)."""


def _tls_options(url: yarl.URL) -> dict[str, Any]:
    """The TLS connection options of a ``rediss://`` URL (none for ``redis://``), for the
    Sentinels and the primary they name."""
    if url.scheme != "rediss":
        return {}
    given = {name: url.query[name] for name in TLS_QUERY_OPTIONS if name in url.query}
    return {"ssl": True, **given}


def _sentinel_login(settings: RedisSettings) -> dict[str, Any]:
    secret = settings.redis_sentinel_password
    return {} if secret is None else {"password": secret.get_secret_value()}


def connect_redis(settings: RedisSettings, **options: Any) -> Redis:
    """A client of the Redis ``settings`` name (``options`` go to every connection, e.g.
    ``socket_timeout``); nothing is connected until the first command.

    Following Sentinel, each new connection asks the Sentinels for the current primary,
    and a connection that finds the old primary gone or turned read-only is dropped, so
    the next command (or the caller's retry) reaches the new primary.
    """
    if not settings.redis_sentinels:
        plain: Redis = Redis.from_url(settings.redis_url, **options)
        return plain
    url = yarl.URL(settings.redis_url)
    database = int(url.path.strip("/") or 0)
    tls = _tls_options(url)
    addresses = [
        (host, int(port))
        for host, _, port in (address.rpartition(":") for address in settings.redis_sentinels)
    ]
    sentinel = Sentinel(  # type: ignore[no-untyped-call]
        addresses,
        sentinel_kwargs={
            "socket_timeout": SENTINEL_TIMEOUT_S,
            "socket_connect_timeout": SENTINEL_TIMEOUT_S,
            **tls,
            **_sentinel_login(settings),
        },
        db=database,
        username=url.user,
        password=url.password,
        **tls,
        **options,
    )
    client: Redis = sentinel.master_for(
        settings.redis_master_name, redis_class=_SentinelFollowingRedis
    )
    return client
