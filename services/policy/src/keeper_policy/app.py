"""Wires the policy service: settings, Redis, bus and handlers."""

from __future__ import annotations

import asyncio
import socket

import structlog
from redis.asyncio import Redis

from keeper_policy.registry import PolicyRegistry
from keeper_policy.settings import PolicySettings
from keeper_policy.workflows import PolicyService
from keeper_shared.bus.client import BusClient, Route
from keeper_shared.bus.topology import POLICY, POLICY_COMMANDS, POLICY_EVENTS
from keeper_shared.messages.host import HostHeartbeat
from keeper_shared.messages.placement import PlaceVm, StopVm
from keeper_shared.messages.state import StatePersisted
from keeper_shared.messages.tpm import EnableTpm

log = structlog.get_logger(__name__)


async def serve(settings: PolicySettings, stop: asyncio.Event) -> None:
    """Run one policy replica until ``stop`` is set."""
    redis = Redis.from_url(settings.redis_url)
    try:
        await redis.ping()
        bus = await BusClient.connect(
            settings.amqp_url, source=f"policy/{socket.gethostname()}", origin=POLICY
        )
        try:
            service = PolicyService(settings, PolicyRegistry(redis), bus)
            await bus.consume(
                POLICY_EVENTS,
                [
                    Route(HostHeartbeat, service.on_heartbeat),
                    Route(StatePersisted, service.on_persisted),
                ],
                prefetch=32,
            )
            await bus.consume(
                POLICY_COMMANDS,
                [
                    Route(EnableTpm, service.on_enable_tpm),
                    Route(PlaceVm, service.on_place),
                    Route(StopVm, service.on_stop),
                ],
                prefetch=16,
            )
            log.info("policy ready")
            await stop.wait()
            log.info("stopping")
        finally:
            await bus.close(settings.shutdown_grace_s)
    finally:
        await redis.aclose()
        log.info("stopped")
