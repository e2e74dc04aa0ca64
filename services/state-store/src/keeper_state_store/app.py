"""Wires the state store: settings, key, Redis (checked durable), bus and handlers."""

from __future__ import annotations

import asyncio

import structlog
from redis.asyncio import Redis

from keeper_shared.bus.client import BusClient, Route
from keeper_shared.bus.topology import STATE_STORE, STATE_STORE_COMMANDS, STATE_STORE_EVENTS
from keeper_shared.encryption import load_key_encryption_key
from keeper_shared.messages.host import HostHeartbeat
from keeper_shared.messages.state import RestoreState, RetrieveState, StateChanged
from keeper_state_store.durability import ensure_durable
from keeper_state_store.repository import StateRepository
from keeper_state_store.settings import StateStoreSettings
from keeper_state_store.state_service import StateService

log = structlog.get_logger(__name__)


async def serve(settings: StateStoreSettings, stop: asyncio.Event) -> None:
    """Run one store replica until ``stop`` is set."""
    structlog.contextvars.bind_contextvars(replica=settings.replica_id)
    kek = load_key_encryption_key(settings.kek_file)
    redis = Redis.from_url(settings.redis_url)
    try:
        durability = await ensure_durable(redis, allow_volatile=settings.allow_volatile_redis)
        bus = await BusClient.connect(
            settings.amqp_url, source=f"state-store/{settings.replica_id}", origin=STATE_STORE
        )
        try:
            repository = StateRepository(redis, kek, history_depth=settings.history_depth)
            service = StateService(settings, repository, bus)
            await bus.consume(
                STATE_STORE_EVENTS,
                [
                    Route(StateChanged, service.on_state_changed),
                    Route(HostHeartbeat, service.on_heartbeat),
                ],
                prefetch=32,
            )
            await bus.consume(
                STATE_STORE_COMMANDS,
                [
                    Route(RetrieveState, service.on_retrieve),
                    Route(RestoreState, service.on_restore),
                ],
                prefetch=8,
            )
            log.info("state store ready", redis=durability, kek_id=kek.key_id)
            await stop.wait()
            log.info("stopping")
        finally:
            await bus.close(settings.shutdown_grace_s)
    finally:
        await redis.aclose()
        log.info("stopped")
