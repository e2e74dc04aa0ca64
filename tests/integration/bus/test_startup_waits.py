"""A service started while Redis or the broker is down waits for it instead of exiting
(found by the chaos run: a store replica restarted during a Redis outage exited at once),
and still stops cleanly on SIGTERM while waiting."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from keeper_devtools.demo.processes import READY_EVENTS, ServiceProcess
from keeper_devtools.localstack import RedisConfig, RedisServer, free_tcp_ports

pytestmark = [pytest.mark.rabbit, pytest.mark.redis]

WAITING = "waiting for a dependency"
TIMEOUT_S = 60.0
"""Generous: against hangs only."""


async def logged(service: ServiceProcess, event: str) -> None:
    """Wait until the service logged ``event``; fail if it exits first."""
    async with asyncio.timeout(TIMEOUT_S):
        while event not in service.logged_events():
            assert service.running, f"{service.name} exited: {service.logged_events()[-5:]}"
            await asyncio.sleep(0.1)


@pytest.fixture
def later_redis(tmp_path: Path, local_servers_installed: None) -> Iterator[RedisServer]:
    """A Redis server on a free port, not started yet."""
    (port,) = free_tcp_ports(1)
    server = RedisServer(RedisConfig(port=port, base_dir=tmp_path / "redis"))
    try:
        yield server
    finally:
        server.stop()


async def test_a_store_started_before_redis_waits_then_serves(
    rabbitmq_url: str,
    later_redis: RedisServer,
    kek_file: Path,
    store_sealing_key_file: Path,
    tmp_path: Path,
) -> None:
    store = ServiceProcess(
        "store",
        "keeper_state_store",
        {
            "KEEPER_STORE_AMQP_URL": rabbitmq_url,
            "KEEPER_STORE_REDIS_URL": later_redis.url,
            "KEEPER_STORE_KEK_FILE": str(kek_file),
            "KEEPER_STORE_SEALING_KEY_FILE": str(store_sealing_key_file),
            "KEEPER_STORE_REPLICA_ID": "store-waits",
            "KEEPER_STORE_LOG_JSON": "true",
        },
        tmp_path / "store.log",
    )
    await store.start()
    try:
        await logged(store, WAITING)
        await asyncio.to_thread(later_redis.start)
        await logged(store, READY_EVENTS[store.module])
    finally:
        code = await store.stop(TIMEOUT_S)
    assert code == 0


async def test_a_policy_replica_waiting_for_the_broker_stops_cleanly_on_sigterm(
    redis_url: str, tmp_path: Path
) -> None:
    (dead_port,) = free_tcp_ports(1)
    policy = ServiceProcess(
        "policy",
        "keeper_policy",
        {
            "KEEPER_POLICY_AMQP_URL": f"amqp://guest:guest@127.0.0.1:{dead_port}/",
            "KEEPER_POLICY_REDIS_URL": redis_url,
            "KEEPER_POLICY_LOG_JSON": "true",
        },
        tmp_path / "policy.log",
    )
    await policy.start()
    try:
        await logged(policy, WAITING)
    finally:
        code = await policy.stop(TIMEOUT_S)
    assert code == 0
    assert not policy.is_ready()
