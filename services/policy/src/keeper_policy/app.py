"""Wires the policy service: settings, Redis, bus, handlers and background tasks."""

from __future__ import annotations

import asyncio
import socket

import structlog
from redis.asyncio import Redis

from keeper_policy.adoption.adopter import Adopter
from keeper_policy.adoption.records import DiscoveredDomains
from keeper_policy.gateway import Gateway
from keeper_policy.hosts.liveness import HostLiveness
from keeper_policy.hosts.registry import HostRegistry
from keeper_policy.hosts.senders import HostSenders
from keeper_policy.placement.claim import PlacementClaims
from keeper_policy.placement.migration import MigrationTracker
from keeper_policy.placement.placer import Placer
from keeper_policy.placement.workflow import PLACE, PlaceRunner
from keeper_policy.service import PolicyService
from keeper_policy.settings import PolicySettings
from keeper_policy.snapshot.deleter import SnapshotDeleter
from keeper_policy.snapshot.memory_records import MemorySnapshots
from keeper_policy.snapshot.reverter import Reverter
from keeper_policy.snapshot.snapshotter import Snapshotter
from keeper_policy.snapshot.workflow import SNAPSHOT, SnapshotRunner
from keeper_policy.stop.plan import StopBounds
from keeper_policy.stop.stopper import Stopper
from keeper_policy.stop.workflow import STOP, StopRunner
from keeper_policy.storage.scripts import PolicyScripts
from keeper_policy.storage.vm_names import VmNames
from keeper_policy.storage.vm_registry import PolicyRegistry
from keeper_policy.templates.handlers import TemplateHandlers
from keeper_policy.templates.records import TemplateRecords
from keeper_policy.tpm.approver import Approver
from keeper_policy.tpm.disabler import TpmDisabler
from keeper_policy.views.queries import PolicyQueries
from keeper_policy.workflows.engine import WorkflowEngine
from keeper_policy.workflows.store import WorkflowStore
from keeper_shared.bus.client import BusClient, Consumer
from keeper_shared.bus.topology import POLICY, POLICY_COMMANDS, POLICY_EVENTS, POLICY_HOST_REQUESTS
from keeper_shared.redis_access.connection import connect_redis
from keeper_shared.runtime.service_runner import ServiceStartup, Serving, serve_on_bus
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
    senders = HostSenders(verify=settings.verify_host_identity)
    memory_snapshots = MemorySnapshots(redis)
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
            SNAPSHOT: SnapshotRunner(gateway, bounds, memory_snapshots),
        },
        lease_s=settings.workflow_lease_s,
        sweep_interval_s=settings.workflow_sweep_interval_s,
    )
    templates = TemplateRecords(redis, scripts)
    approver = Approver(settings, registry, hosts, gateway)
    placer = Placer(settings, registry, hosts, workflows, engine, templates)
    stopper = Stopper(registry, engine, bounds, lease_s=settings.workflow_lease_s)
    return PolicyService(
        registry=registry,
        hosts=hosts,
        engine=engine,
        approver=approver,
        placer=placer,
        stopper=stopper,
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
        reverter=Reverter(registry, memory_snapshots, stopper, placer),
        snapshot_deleter=SnapshotDeleter(
            memory_snapshots, hosts, engine, gateway, store_timeout_s=settings.retrieve_timeout_s
        ),
        queries=PolicyQueries(registry, hosts, lost_after_s=settings.host_lost_after_s),
        disabler=TpmDisabler(
            registry, engine, gateway, store_timeout_s=settings.retrieve_timeout_s
        ),
        adopter=Adopter(settings, registry, hosts, gateway, DiscoveredDomains(redis)),
        claims=PlacementClaims(settings, registry, hosts, engine, gateway, senders),
        senders=senders,
        templates=TemplateHandlers(
            templates, registry, approver, gateway, store_timeout_s=settings.retrieve_timeout_s
        ),
        receiver_levels=bus.levels,
    )


async def serve(settings: PolicySettings, stop: asyncio.Event) -> None:
    """Run one policy replica until ``stop`` is set."""
    redis = connect_redis(settings)
    try:
        names = VmNames(redis, PolicyScripts(redis))
        try:
            await wait_for_dependency(redis.ping, "Redis", stop, retry_on=REDIS_UNAVAILABLE)
            # Before any approval: a name claimed by a VM registered by an older release
            # must be in the index it is checked against.
            await wait_for_dependency(
                names.index_existing, "Redis", stop, retry_on=REDIS_UNAVAILABLE
            )
        except StoppedWhileWaitingError:
            return

        async def set_up(startup: ServiceStartup) -> Serving:
            service = build_service(settings, redis, startup.bus)
            # Runs after the consumers stopped (registered before them): hands the workflows
            # over, leases released, and another replica resumes them.
            startup.before_bus_closes.push_async_callback(service.close)
            consumers: list[Consumer] = []

            async def stop_consumers() -> None:
                # Take no new messages, and give in-flight requests the grace period (a stop
                # waiting on its workflow may finish); what is still running is cancelled,
                # and its request is redelivered to another replica.
                for consumer in consumers:
                    await consumer.stop(settings.shutdown_grace_s)

            startup.before_bus_closes.push_async_callback(stop_consumers)
            consumers.append(
                await startup.bus.consume(POLICY_EVENTS, service.event_routes(), prefetch=32)
            )
            consumers.append(
                await startup.bus.consume(POLICY_COMMANDS, service.command_routes(), prefetch=16)
            )
            consumers.append(
                await startup.bus.consume(
                    POLICY_HOST_REQUESTS, service.host_request_routes(), prefetch=16
                )
            )
            service.start_background()
            return Serving(
                dead_letter_queues=[
                    POLICY_EVENTS.dead_letter_queue,
                    POLICY_COMMANDS.dead_letter_queue,
                    POLICY_HOST_REQUESTS.dead_letter_queue,
                ]
            )

        await serve_on_bus(
            stop,
            set_up,
            name="policy",
            amqp_endpoints=settings.amqp_endpoints,
            source=f"policy/{socket.gethostname()}",
            origin=POLICY,
            grace_s=settings.shutdown_grace_s,
            redis=redis,
        )
    finally:
        await redis.aclose()
        log.info("stopped")
