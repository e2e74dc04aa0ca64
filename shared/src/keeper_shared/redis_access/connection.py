"""One way to reach Redis for every component: a plain URL, the primary that Redis
Sentinel names (followed through failovers), or a Redis Cluster (each key on the primary
that serves its slot, followed through failovers)."""

from __future__ import annotations

from typing import Annotated, Any, cast

import yarl
from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import NoDecode
from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.sentinel import Sentinel
from redis.commands.core import AsyncScript
from redis.typing import ScriptTextT

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
            "are then reached over TLS too when the scheme is rediss. With "
            "redis_cluster_nodes set, likewise only the scheme, user, password and TLS "
            "options are used (and the database must be 0, the only one a cluster has)."
        ),
    )
    redis_cluster_nodes: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Redis Cluster nodes to learn the cluster's layout from (host:port, "
        "comma-separated; any reachable one will do); empty: not a cluster. Exclusive with "
        "redis_sentinels.",
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

    _split_addresses = field_validator("redis_sentinels", "redis_cluster_nodes", mode="before")(
        split_list
    )

    @field_validator("redis_sentinels", "redis_cluster_nodes")
    @classmethod
    def _check_addresses(cls, addresses: list[str]) -> list[str]:
        for address in addresses:
            host, _, port = address.rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(
                    f"a Sentinel or cluster node address is host:port, not {address!r}"
                )
        return addresses

    @model_validator(mode="after")
    def _one_topology(self) -> RedisSettings:
        if self.redis_cluster_nodes and self.redis_sentinels:
            raise ValueError("set redis_sentinels or redis_cluster_nodes, not both")
        if self.redis_cluster_nodes and yarl.URL(self.redis_url).path.strip("/") not in ("", "0"):
            raise ValueError("a Redis Cluster has database 0 only: end redis_url with /0")
        return self


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
    if settings.redis_cluster_nodes:
        return _connect_cluster(settings, **options)
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


def _connect_cluster(settings: RedisSettings, **options: Any) -> Redis:
    """A Redis Cluster client, typed as the plain client its callers take.

    redis-py gives ``RedisCluster`` the same command methods as ``Redis`` (both mix in the
    same command classes) but no common base type, so the one cast is here. Where the two
    behave differently the callers check for `is_cluster`: a cluster pipeline runs no
    MULTI/EXEC over several slots and WAIT must go to each shard that was written
    (``keeper_state_store.storage.replication``). Every key one script or transaction
    touches carries one VM's hash tag (``keys.py``), so all of them are in one slot.
    """
    url = yarl.URL(settings.redis_url)
    nodes = [
        ClusterNode(host, int(port))
        for host, _, port in (address.rpartition(":") for address in settings.redis_cluster_nodes)
    ]
    cluster = KeeperRedisCluster(
        startup_nodes=nodes,
        username=url.user,
        password=url.password,
        # Learn the whole layout again after any redirect or lost connection. Besides being
        # right after a failover (every slot of the lost primary moved at once), this keeps
        # redis-py 6.4 off a path that breaks: a transaction that lost its connection hands
        # the ConnectionError to the MOVED handling, which then fails with AttributeError.
        reinitialize_steps=1,
        **_tls_options(url),
        **options,
    )
    return cast(Redis, cluster)


class KeeperRedisCluster(RedisCluster):
    """A Redis Cluster client that remembers the scripts registered on it by SHA-1.

    redis-py's pipeline for a single Redis loads a pipeline's scripts itself; its cluster
    pipeline does not, and a replica promoted by a failover has an empty script cache (Redis
    7 replicates a script's effects, not the script). A write that meets NOSCRIPT there is
    run again once its script is loaded, which needs its text.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.scripts: dict[str, AsyncScript] = {}
        """SHA-1 -> every script registered on this client."""

    # redis-py types register_script for its synchronous client only.
    def register_script(self, script: ScriptTextT) -> AsyncScript:  # type: ignore[override]
        """`RedisCluster.register_script`, remembered in `scripts`."""
        registered: AsyncScript = super().register_script(script)  # type: ignore[misc]
        self.scripts[registered.sha] = registered
        return registered


def cluster_of(redis: Redis) -> KeeperRedisCluster | None:
    """The Redis Cluster client ``redis`` is (see `_connect_cluster`), None for a single
    Redis or a Sentinel-followed one."""
    # The client is typed as Redis although it may be the cluster client (one cast above).
    return redis if isinstance(redis, KeeperRedisCluster) else None
