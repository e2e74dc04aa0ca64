"""Wires the state store: settings, key, Redis (checked durable), bus and handlers."""

from __future__ import annotations

import asyncio

import structlog

from keeper_shared.bus.topology import (
    STATE_STORE,
    STATE_STORE_COMMANDS,
    STATE_STORE_EVENTS,
    STATE_STORE_HOST_REQUESTS,
)
from keeper_shared.redis_access.connection import connect_redis
from keeper_shared.runtime.service_runner import ServiceStartup, Serving, serve_on_bus
from keeper_shared.runtime.startup import (
    REDIS_UNAVAILABLE,
    StoppedWhileWaitingError,
    wait_for_dependency,
)
from keeper_shared.sealing.keys import SealingPrivateKeys
from keeper_state_store.crypto.bus_sealing import HostSealingKeys, StoreBusSealing
from keeper_state_store.crypto.key_ring import KeyRing
from keeper_state_store.handlers.deletion import DeletionService
from keeper_state_store.handlers.endorsement import EndorsementKeys
from keeper_state_store.handlers.history import HistoryService
from keeper_state_store.handlers.host_requests import HostRequests
from keeper_state_store.handlers.state import StateService
from keeper_state_store.handlers.transfer import TransferService
from keeper_state_store.scrub.maintenance import Maintenance
from keeper_state_store.settings import StateStoreSettings
from keeper_state_store.storage.durability import ensure_durable
from keeper_state_store.storage.replication import ReplicaQuorum
from keeper_state_store.storage.repository import StateRepository
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
        except StoppedWhileWaitingError:
            return

        async def set_up(startup: ServiceStartup) -> Serving:
            bus = startup.bus
            maintenance = Maintenance(settings, redis, keys, bus)  # scrubber, KEK rotation
            startup.before_bus_closes.push_async_callback(maintenance.close)
            repository = StateRepository(
                redis,
                keys,
                history_depth=settings.history_depth,
                replicas=ReplicaQuorum(
                    settings.redis_min_replicas, settings.redis_replica_timeout_ms
                ),
            )
            sealing = StoreBusSealing(
                SealingPrivateKeys.from_files(
                    settings.sealing_key_file, settings.previous_sealing_key_files
                ),
                HostSealingKeys(redis),
            )
            service = StateService(settings, repository, bus, sealing)
            # Its pulls in flight end after the consumers that wait for them stopped.
            startup.after_bus_closes.push_async_callback(service.close)
            # Prefetch bounds how many state.changed events can wait in one pull batch, and
            # with many hosts of few changes each, the VMs in flight (see the setting).
            await bus.consume(
                STATE_STORE_EVENTS, service.event_routes(), prefetch=settings.events_prefetch
            )
            await bus.consume(
                STATE_STORE_COMMANDS,
                [
                    *service.command_routes(),
                    *HistoryService(repository).command_routes(),
                    *TransferService(repository, sealing.own).command_routes(),
                    *DeletionService(repository, bus).command_routes(),
                    *StoreQueries(repository).command_routes(),
                    *EndorsementKeys(repository, temp_dir=settings.scrub_temp_dir).command_routes(),
                ],
                prefetch=8,
            )
            host_requests = HostRequests(
                repository, service, verify_host_identity=settings.verify_host_identity
            )
            await bus.consume(STATE_STORE_HOST_REQUESTS, host_requests.routes(), prefetch=8)
            maintenance.start()
            return Serving(
                dead_letter_queues=[
                    STATE_STORE_EVENTS.dead_letter_queue,
                    STATE_STORE_COMMANDS.dead_letter_queue,
                    STATE_STORE_HOST_REQUESTS.dead_letter_queue,
                ],
                ready_fields={
                    "redis": durability,
                    "kek_id": keys.current.key_id,
                    "sealing_key_id": sealing.own.public.key_id,
                },
            )

        await serve_on_bus(
            stop,
            set_up,
            name="state store",
            amqp_endpoints=settings.amqp_endpoints,
            source=f"state-store/{settings.replica_id}",
            origin=STATE_STORE,
            grace_s=settings.shutdown_grace_s,
            redis=redis,
        )
    finally:
        await redis.aclose()
        log.info("stopped")
