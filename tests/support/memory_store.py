"""A state store's handlers on the in-memory bus double with a real Redis, one simulated
host that answers fetches and prepares, and one VM placed on it: what the store's
memory-bus tests start from."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from redis.asyncio import Redis

from keeper_shared.bus.client import Route
from keeper_shared.bus.topology import (
    STATE_STORE,
    STATE_STORE_COMMANDS,
    STATE_STORE_EVENTS,
    STATE_STORE_HOST_REQUESTS,
    host_command_queue,
)
from keeper_shared.messages.state import FetchState
from keeper_shared.messages.vm import PrepareVm
from keeper_shared.redis_access.keys import PREFIX, placement_key
from keeper_shared.redis_access.results import awaited
from keeper_state_store.crypto.encryption import KeyEncryptionKey
from keeper_state_store.crypto.key_ring import KeyRing
from keeper_state_store.handlers.host_requests import HostRequests
from keeper_state_store.handlers.state import StateService
from keeper_state_store.settings import StateStoreSettings
from keeper_state_store.storage.repository import StateRepository
from support.in_process_store import FakeHost
from support.memory_bus import MemoryBroker
from support.sealing_keys import forget_hosts, register_host, store_sealing

STORE_HOST = "host-a"
"""The simulated host the VM is placed on (epoch 1)."""


@dataclass
class MemoryStore:
    """The running pieces a test talks to."""

    broker: MemoryBroker
    host: FakeHost
    repository: StateRepository
    redis: Redis
    vm_id: str


@contextlib.asynccontextmanager
async def memory_store(
    redis_url: str,
    kek: KeyEncryptionKey,
    *,
    history_depth: int = 10,
    host_key_wait_s: float = 1.0,
) -> AsyncIterator[MemoryStore]:
    """The store's event, command and host-request handlers with identity checks on; the
    VM's keys are deleted from Redis afterwards."""
    broker = MemoryBroker()
    redis = Redis.from_url(redis_url)
    repository = StateRepository(redis, KeyRing(kek), history_depth=history_depth)
    settings = StateStoreSettings(
        amqp_url="amqp://unused/",
        redis_url=redis_url,
        kek_file=Path("/nonexistent/kek"),
        sealing_key_file=Path("/nonexistent/sealing"),  # keys handed over directly
        allow_volatile_redis=True,
        fetch_timeout_s=10.0,
        host_key_wait_s=host_key_wait_s,
        verify_host_identity=True,
    )
    store_bus = broker.client(source="state-store/t", origin=STATE_STORE)
    sealing = store_sealing(redis)
    service = StateService(settings, repository, store_bus, sealing)
    host = FakeHost(
        host_id=STORE_HOST,
        bus=broker.client(source=f"host-agent/{STORE_HOST}", origin=STORE_HOST),
        store_key=sealing.own.public,
    )
    await register_host(sealing, STORE_HOST, host.keys.public)
    await host.bus.consume(
        host_command_queue(STORE_HOST),
        [Route(FetchState, host.on_fetch), Route(PrepareVm, host.on_prepare)],
        prefetch=8,
    )
    await store_bus.consume(STATE_STORE_EVENTS, service.event_routes(), prefetch=32)
    await store_bus.consume(STATE_STORE_COMMANDS, service.command_routes(), prefetch=8)
    host_requests = HostRequests(repository, service, verify_host_identity=True)
    await store_bus.consume(STATE_STORE_HOST_REQUESTS, host_requests.routes(), prefetch=8)
    vm_id = str(uuid.uuid4())
    await awaited(redis.hset(placement_key(vm_id), mapping={"host": STORE_HOST, "epoch": 1}))
    try:
        yield MemoryStore(broker, host, repository, redis, vm_id)
    finally:
        await service.close()
        await forget_hosts(redis, STORE_HOST)
        keys = [key async for key in redis.scan_iter(match=f"{PREFIX}:{{{vm_id}}}:*")]
        if keys:
            await redis.delete(*keys)
        await redis.aclose()
