"""The chaos harness's services, pointed at the distributed engines.

`EngineChaosCluster` is the harness's `ChaosCluster` (every service a real process) whose
services connect to every node of a RabbitMQ cluster and follow Redis through Sentinel,
while the harness itself (its client, event recorder and Redis reader) stays on the node
and the primary the test names, or follows Sentinel too.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field

from pydantic import SecretStr
from redis.asyncio import Redis

from chaos.harness import ChaosCluster, ClusterConfig
from keeper_devtools.demo.hosts import SimulatedHost
from keeper_devtools.demo.processes import ServiceProcess
from keeper_shared.redis_access.connection import RedisSettings, connect_redis

SERVICE_PREFIXES = {
    "keeper_state_store": "KEEPER_STORE_",
    "keeper_policy": "KEEPER_POLICY_",
    "keeper_host_agent": "KEEPER_HOST_",
}


@dataclass(frozen=True)
class Engines:
    """How the services reach the distributed engines (empty: as the harness says)."""

    amqp_urls: Sequence[str] = ()
    """Every node, in the order the services try them."""
    redis_sentinels: Sequence[str] = ()
    redis_master_name: str = "keeper"
    redis_sentinel_password: str | None = None
    store_min_replicas: int = 0
    store_replica_timeout_ms: int = 2000
    extra: dict[str, str] = field(default_factory=dict)
    """More settings for every service, without the service's prefix."""

    def settings(self, module: str) -> dict[str, str]:
        """The environment for one service module."""
        values: dict[str, str] = dict(self.extra)
        if self.amqp_urls:
            values["AMQP_URLS"] = ",".join(self.amqp_urls)
        if self.redis_sentinels and module != "keeper_host_agent":
            values["REDIS_SENTINELS"] = ",".join(self.redis_sentinels)
            values["REDIS_MASTER_NAME"] = self.redis_master_name
            if self.redis_sentinel_password is not None:
                values["REDIS_SENTINEL_PASSWORD"] = self.redis_sentinel_password
        if module == "keeper_state_store":
            values["REDIS_MIN_REPLICAS"] = str(self.store_min_replicas)
            values["REDIS_REPLICA_TIMEOUT_MS"] = str(self.store_replica_timeout_ms)
        prefix = SERVICE_PREFIXES[module]
        return {f"{prefix}{name}": value for name, value in values.items()}


class EngineChaosCluster(ChaosCluster):
    """A `ChaosCluster` whose services use `Engines`; its own Redis reader follows the
    Sentinels too when there are some, so the checks read the current primary."""

    def __init__(self, config: ClusterConfig, engines: Engines) -> None:
        self.engines = engines
        super().__init__(config)
        self._following: Redis | None = None
        if engines.redis_sentinels:
            self._following = connect_redis(
                RedisSettings(
                    redis_url=config.redis_url,
                    redis_sentinels=list(engines.redis_sentinels),
                    redis_master_name=engines.redis_master_name,
                    redis_sentinel_password=(
                        None
                        if engines.redis_sentinel_password is None
                        else SecretStr(engines.redis_sentinel_password)
                    ),
                )
            )

    @property
    def redis(self) -> Redis:
        """The harness's Redis reader: the current primary when Sentinels are in use."""
        return self._following if self._following is not None else super().redis

    def _store(self, index: int) -> ServiceProcess:
        return self._on_engines(super()._store(index))

    def _policy(self, index: int) -> ServiceProcess:
        return self._on_engines(super()._policy(index))

    def _agent(self, index: int, host: SimulatedHost) -> ServiceProcess:
        return self._on_engines(super()._agent(index, host))

    def _on_engines(self, service: ServiceProcess) -> ServiceProcess:
        service.env.update(self.engines.settings(service.module))
        return service

    async def stop(self) -> dict[str, int | None]:
        """Stop every service, then the Sentinel-following reader."""
        codes = await super().stop()
        if self._following is not None:
            with contextlib.suppress(Exception):
                await self._following.aclose()
            self._following = None
        return codes
