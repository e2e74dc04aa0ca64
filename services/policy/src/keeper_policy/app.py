"""Wires the policy service: settings, Redis, bus, handlers and background tasks."""

from __future__ import annotations

import asyncio
import socket

import structlog
from redis.asyncio import Redis

from keeper_policy.gateway import Gateway
from keeper_policy.hosts.liveness import HostLiveness
from keeper_policy.hosts.registry import HostRegistry
from keeper_policy.placement.migration import MigrationTracker
from keeper_policy.placement.placer import Placer
from keeper_policy.placement.workflow import PLACE, PlaceRunner
from keeper_policy.service import PolicyService
from keeper_policy.settings import PolicySettings
from keeper_policy.snapshot.snapshotter import Snapshotter
from keeper_policy.snapshot.workflow import SNAPSHOT, SnapshotRunner
from keeper_policy.stop.plan import StopBounds
from keeper_policy.stop.stopper import Stopper
from keeper_policy.stop.workflow import STOP, StopRunner
from keeper_policy.storage.scripts import PolicyScripts
from keeper_policy.storage.vm_registry import PolicyRegistry
from keeper_policy.tpm.approver import Approver
from keeper_policy.tpm.disabler import TpmDisabler
from keeper_policy.workflows.engine import WorkflowEngine
from keeper_policy.workflows.store import WorkflowStore
from keeper_shared.bus.client import BusClient, Consumer
from keeper_shared.bus.topology import POLICY, POLICY_COMMANDS, POLICY_EVENTS
from keeper_shared.observability import observe_service
from keeper_shared.redis_access.connection import connect_redis
from keeper_shared.runtime.startup import (
    REDIS_UNAVAILABLE,
    StoppedWhileWaitingError,
    wait_for_dependency,
)

log = structlog.get_logger(__name__)


def build_service(settings: PolicySettings, redis: Redis, bus: BusClient) -> PolicyService:
    """Every part of one replica, wired."""
    scripts = PolicyScripts(redis)
    registry = PolicyRegistry(redis, scripts)
    hosts = HostRegistry(redis, scripts)
    workflows = WorkflowStore(redis, scripts)
    gateway = Gateway(
        bus,
        retrieve_timeout_s=settings.retrieve_timeout_s,
        host_command_timeout_s=settings.host_command_timeout_s,
    )
    bounds = StopBounds(
        retrieve_attempts=settings.retrieve_attempts,
        retrieve_timeout_s=settings.retrieve_timeout_s,
        host_command_timeout_s=settings.host_command_timeout_s,
    )
    engine = WorkflowEngine(
        workflows,
        {
            STOP: StopRunner(gateway, registry, hosts, bounds),
            PLACE: PlaceRunner(settings, gateway, registry, hosts),
            SNAPSHOT: SnapshotRunner(gateway, bounds),
        },
        lease_s=settings.workflow_lease_s,
        sweep_interval_s=settings.workflow_sweep_interval_s,
    )
    return PolicyService(
        registry=registry,
        hosts=hosts,
        engine=engine,
        approver=Approver(settings, registry, hosts, gateway),
        placer=Placer(settings, registry, hosts, workflows, engine),
        stopper=Stopper(registry, engine, bounds, lease_s=settings.workflow_lease_s),
        liveness=HostLiveness(
            redis,
            registry,
            hosts,
            gateway,
            lost_after_s=settings.host_lost_after_s,
            check_interval_s=settings.liveness_check_interval_s,
        ),
        migrations=MigrationTracker(registry, hosts, gateway, window_s=settings.migration_window_s),
        snapshots=Snapshotter(registry, engine, gateway, bounds, settings.workflow_lease_s),
        disabler=TpmDisabler(
            registry, engine, gateway, store_timeout_s=settings.retrieve_timeout_s
        ),
    )


async def serve(settings: PolicySettings, stop: asyncio.Event) -> None:
    """Run one policy replica until ``stop`` is set."""
    redis = connect_redis(settings)
    try:
        try:
            await wait_for_dependency(redis.ping, "Redis", stop, retry_on=REDIS_UNAVAILABLE)
            bus = await BusClient.connect_when_up(
                settings.amqp_endpoints,
                source=f"policy/{socket.gethostname()}",
                origin=POLICY,
                stop=stop,
            )
        except StoppedWhileWaitingError:
            return
        service: PolicyService | None = None
        consumers: list[Consumer] = []
        try:
            service = build_service(settings, redis, bus)
            consumers.append(await bus.consume(POLICY_EVENTS, service.event_routes(), prefetch=32))
            consumers.append(
                await bus.consume(POLICY_COMMANDS, service.command_routes(), prefetch=16)
            )
            service.start_background()

            dead_letter_queues = [
                POLICY_EVENTS.dead_letter_queue,
                POLICY_COMMANDS.dead_letter_queue,
            ]
            async with observe_service(bus, dead_letter_queues, redis):
                log.info("policy ready")
                await stop.wait()
                log.info("stopping")
        finally:
            # Take no new messages, and give in-flight requests the grace period (a stop
            # waiting on its workflow may finish); what is still running is cancelled, and
            # its request is redelivered to another replica.
            for consumer in consumers:
                await consumer.stop(settings.shutdown_grace_s)
            # Then hand the workflows over: leases released, another replica resumes them.
            if service is not None:
                await service.close()
            await bus.close(settings.shutdown_grace_s)
    finally:
        await redis.aclose()
        log.info("stopped")
