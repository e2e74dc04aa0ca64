"""Wires the state store: settings, key, Redis (checked durable), bus and handlers."""

from __future__ import annotations

import asyncio

import structlog

from keeper_shared.bus.client import BusClient
from keeper_shared.bus.topology import STATE_STORE, STATE_STORE_COMMANDS, STATE_STORE_EVENTS
from keeper_shared.observability import observe_service
from keeper_shared.redis_access.connection import connect_redis
from keeper_shared.runtime.startup import (
    REDIS_UNAVAILABLE,
    StoppedWhileWaitingError,
    wait_for_dependency,
)
from keeper_state_store.crypto.key_ring import KeyRing
from keeper_state_store.deletion_service import DeletionService
from keeper_state_store.durability import ensure_durable
from keeper_state_store.history_service import HistoryService
from keeper_state_store.maintenance import Maintenance
from keeper_state_store.repository import StateRepository
from keeper_state_store.settings import StateStoreSettings
from keeper_state_store.state_service import StateService
from keeper_state_store.storage.replication import ReplicaQuorum
from keeper_state_store.transfer_service import TransferService
from keeper_state_store.views.queries import StoreQueries

log = structlog.get_logger(__name__)


async def serve(settings: StateStoreSettings, stop: asyncio.Event) -> None:
    """Run one store replica until ``stop`` is set."""
    structlog.contextvars.bind_contextvars(replica=settings.replica_id)
    keys = KeyRing.from_files(settings.kek_file, settings.previous_kek_files)
    redis = connect_redis(settings)
    try:
        try:
            durability = await wait_for_dependency(
                lambda: ensure_durable(redis, allow_volatile=settings.allow_volatile_redis),
                "Redis",
                stop,
                retry_on=REDIS_UNAVAILABLE,
            )
            bus = await BusClient.connect_when_up(
                settings.amqp_endpoints,
                source=f"state-store/{settings.replica_id}",
                origin=STATE_STORE,
                stop=stop,
            )
        except StoppedWhileWaitingError:
            return
        maintenance = Maintenance(settings, redis, keys, bus)  # scrubber, KEK rotation
        service: StateService | None = None
        try:
            repository = StateRepository(
                redis,
                keys,
                history_depth=settings.history_depth,
                replicas=ReplicaQuorum(
                    settings.redis_min_replicas, settings.redis_replica_timeout_ms
                ),
            )
            service = StateService(settings, repository, bus)
            # Prefetch bounds how many state.changed events can wait in one pull batch.
            await bus.consume(STATE_STORE_EVENTS, service.event_routes(), prefetch=32)
            await bus.consume(
                STATE_STORE_COMMANDS,
                [
                    *service.command_routes(),
                    *HistoryService(repository).command_routes(),
                    *TransferService(repository).command_routes(),
                    *DeletionService(repository, bus).command_routes(),
                    *StoreQueries(repository).command_routes(),
                ],
                prefetch=8,
            )
            maintenance.start()

            dead_letter_queues = [
                STATE_STORE_EVENTS.dead_letter_queue,
                STATE_STORE_COMMANDS.dead_letter_queue,
            ]
            async with observe_service(bus, dead_letter_queues, redis):
                log.info("state store ready", redis=durability, kek_id=keys.current.key_id)
                await stop.wait()
                log.info("stopping")
        finally:
            await maintenance.close()
            await bus.close(settings.shutdown_grace_s)
            if service is not None:
                await service.close()
    finally:
        await redis.aclose()
        log.info("stopped")
