"""Settings for a RabbitMQ cluster's nodes and for Redis behind Sentinel."""

from __future__ import annotations

import pydantic
import pytest

from keeper_shared.bus.node_failover import broker_user
from keeper_shared.redis_access.connection import RedisSettings
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
