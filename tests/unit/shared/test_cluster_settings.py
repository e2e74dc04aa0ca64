"""Settings for a RabbitMQ cluster's nodes and for Redis behind Sentinel."""

from __future__ import annotations

import pydantic
import pytest
from redis.asyncio.connection import SSLConnection

from keeper_shared.bus.node_failover import broker_user
from keeper_shared.redis_access.connection import RedisSettings, cluster_of, connect_redis
from keeper_shared.runtime.settings import ServiceSettings


def test_amqp_urls_come_comma_separated_or_as_json_and_default_to_amqp_url(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("AMQP_URLS", "amqp://a/, amqp://b/")
    assert ServiceSettings().amqp_endpoints == ["amqp://a/", "amqp://b/"]
    monkeypatch.setenv("AMQP_URLS", '["amqp://c/"]')
    assert ServiceSettings().amqp_endpoints == ["amqp://c/"]
    monkeypatch.delenv("AMQP_URLS")
    monkeypatch.setenv("AMQP_URL", "amqp://only/")
    assert ServiceSettings().amqp_endpoints == ["amqp://only/"]


def test_the_nodes_of_one_service_share_one_user() -> None:
    assert broker_user(["amqp://h1:x@n1/", "amqp://h1:y@n2/"]) == "h1"
    with pytest.raises(ValueError, match="same user"):
        broker_user(["amqp://host-a:x@n1/", "amqp://host-b:x@n2/"])


def test_sentinel_addresses_are_host_and_port() -> None:
    settings = RedisSettings.model_validate({"redis_sentinels": "s1:26379, s2:26379"})
    assert settings.redis_sentinels == ["s1:26379", "s2:26379"]
    with pytest.raises(pydantic.ValidationError, match="host:port"):
        RedisSettings.model_validate({"redis_sentinels": "s1"})


async def test_a_rediss_url_puts_the_sentinels_and_the_primary_on_tls() -> None:
    """Following Sentinel, the URL's TLS options reach both: the Sentinels (whose answers
    name the primary) and the primary's connections (the real servers:
    tests/distributed/test_replica_quorum.py)."""
    settings = RedisSettings(
        redis_url="rediss://keeper-store:pw@ignored:1/3?ssl_ca_certs=/etc/ca.pem",
        redis_sentinels=["s1:26379"],
    )
    client = connect_redis(settings)
    try:
        pool = client.connection_pool
        assert issubclass(pool.connection_class, SSLConnection)
        assert pool.connection_kwargs["ssl_ca_certs"] == "/etc/ca.pem"
        assert pool.connection_kwargs["username"] == "keeper-store"
        assert pool.connection_kwargs["db"] == 3
        sentinel = pool.sentinel_manager.sentinels[0].connection_pool  # type: ignore[attr-defined]
        assert issubclass(sentinel.connection_class, SSLConnection)
        assert sentinel.connection_kwargs["ssl_ca_certs"] == "/etc/ca.pem"
    finally:
        await client.aclose()


async def test_a_plain_url_keeps_the_sentinels_plain() -> None:
    settings = RedisSettings(redis_url="redis://u:pw@ignored:1/0", redis_sentinels=["s1:26379"])
    client = connect_redis(settings)
    try:
        pool = client.connection_pool
        assert not issubclass(pool.connection_class, SSLConnection)
        assert "ssl_ca_certs" not in pool.connection_kwargs
    finally:
        await client.aclose()


def test_redis_cluster_nodes_are_host_and_port_and_exclude_sentinels() -> None:
    settings = RedisSettings.model_validate({"redis_cluster_nodes": "n1:6379, n2:6379"})
    assert settings.redis_cluster_nodes == ["n1:6379", "n2:6379"]
    with pytest.raises(pydantic.ValidationError, match="host:port"):
        RedisSettings.model_validate({"redis_cluster_nodes": "n1"})
    with pytest.raises(pydantic.ValidationError, match="not both"):
        RedisSettings.model_validate({"redis_cluster_nodes": "n1:1", "redis_sentinels": "s1:2"})
    with pytest.raises(pydantic.ValidationError, match="database 0 only"):
        RedisSettings.model_validate(
            {"redis_cluster_nodes": "n1:1", "redis_url": "redis://127.0.0.1/3"}
        )


async def test_cluster_nodes_make_a_cluster_client_with_the_urls_login_and_tls() -> None:
    """Nothing is connected: the client only holds what it will log in and verify with."""
    client = connect_redis(
        RedisSettings(
            redis_url="rediss://keeper-store:pw@ignored:1/0?ssl_ca_certs=/etc/ca.pem",
            redis_cluster_nodes=["n1:7001", "n2:7002"],
        )
    )
    try:
        cluster = cluster_of(client)
        assert cluster is not None
        startup = cluster.nodes_manager.startup_nodes
        assert list(startup) == ["n1:7001", "n2:7002"]
        options = startup["n1:7001"].connection_kwargs
        assert (options["username"], options["password"]) == ("keeper-store", "pw")
        assert options["ssl_ca_certs"] == "/etc/ca.pem"
        assert startup["n1:7001"].connection_class is SSLConnection
    finally:
        await client.aclose()
    assert cluster_of(connect_redis(RedisSettings(redis_url="redis://127.0.0.1/0"))) is None
