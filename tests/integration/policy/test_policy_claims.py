"""A start by another VM manager on a host (the QEMU hook's ``vm.claim``), decided by policy
on the in-memory bus double against a real Redis: an unregistered VM starts untouched, a
registered one is placed on the host that starts it under a new epoch (fencing the old one)
and is then the manager's (never undefined by a stop), a repeat keeps the epoch, and a claim
for another host or from a host that is not the sender is refused."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest_asyncio

from keeper_policy.app import build_service
from keeper_policy.settings import PolicySettings
from keeper_policy.storage.scripts import PolicyScripts
from keeper_policy.storage.vm_registry import PolicyRegistry
from keeper_shared.bus.topology import POLICY, POLICY_COMMANDS, POLICY_EVENTS, POLICY_HOST_REQUESTS
from keeper_shared.messages.host import HostCapabilities, HostHeartbeat
from keeper_shared.messages.host_requests import ClaimOutcome, ClaimPlacement, PlacementClaimed
from keeper_shared.messages.replies import EnableTpmReply
from keeper_shared.messages.tpm import EnableTpm, VmSpec
from support.memory_bus import MemoryBroker
from support.redis_db import PrivateDatabase

TIMEOUT_S = 30.0
"""Generous: against hangs only."""


@dataclass
class Scene:
    broker: MemoryBroker
    registry: PolicyRegistry


@pytest_asyncio.fixture
async def scene(private_redis: PrivateDatabase) -> AsyncIterator[Scene]:
    broker = MemoryBroker()
    settings = PolicySettings(
        amqp_url="amqp://unused/", redis_url=private_redis.url, verify_host_identity=True
    )
    bus = broker.client(source="policy/t", origin=POLICY)
    service = build_service(settings, private_redis.client, bus)
    await bus.consume(POLICY_EVENTS, service.event_routes(), prefetch=32)
    await bus.consume(POLICY_COMMANDS, service.command_routes(), prefetch=16)
    await bus.consume(POLICY_HOST_REQUESTS, service.host_request_routes(), prefetch=16)
    for host in ("host-a", "host-b"):
        await beat(broker, host)
    try:
        yield Scene(
            broker, PolicyRegistry(private_redis.client, PolicyScripts(private_redis.client))
        )
    finally:
        await service.close()


async def beat(broker: MemoryBroker, host: str) -> None:
    capabilities = HostCapabilities(
        swtpm_version="0.7.1", libvirt_version="9.0.0", architectures=["x86_64"], uefi_firmware=True
    )
    bus = broker.client(source=f"host-agent/{host}", origin=host)
    beat = HostHeartbeat(host=host, interval_s=5.0, capabilities=capabilities, vms=[])
    await bus.publish_event(beat, subject=host)
    await broker.settled()


async def register(scene: Scene) -> str:
    spec = VmSpec(vm_id=str(uuid.uuid4()), name="win-01", guest_os="windows-11")
    caller = scene.broker.client(source="automation/t", origin="automation")
    done = await caller.call(
        POLICY, EnableTpm(spec=spec), EnableTpmReply, subject=spec.vm_id, timeout_s=TIMEOUT_S
    )
    assert done.data.ok, done.data.error
    return spec.vm_id


async def claim(
    scene: Scene, vm_id: str, host: str, *, sender: str | None = None
) -> PlacementClaimed:
    bus = scene.broker.client(source=f"host-agent/{host}", origin=host, user_id=sender or host)
    reply = await bus.call(
        POLICY,
        ClaimPlacement(vm_id=vm_id, host=host, name="win-01"),
        PlacementClaimed,
        subject=vm_id,
        timeout_s=TIMEOUT_S,
        host_request=True,
    )
    return reply.data


async def test_an_unregistered_vm_starts_untouched(scene: Scene) -> None:
    claimed = await claim(scene, str(uuid.uuid4()), "host-a")
    assert claimed.outcome is ClaimOutcome.UNREGISTERED


async def test_a_registered_vm_is_placed_where_its_manager_starts_it_and_is_the_managers(
    scene: Scene,
) -> None:
    vm_id = await register(scene)

    first = await claim(scene, vm_id, "host-a")
    again = await claim(scene, vm_id, "host-a")

    assert (first.outcome, first.epoch) == (ClaimOutcome.MOVED, 1)
    assert (again.outcome, again.epoch) == (ClaimOutcome.KEPT, 1)
    placement = await scene.registry.placement(vm_id)
    assert (placement.host, placement.epoch) == ("host-a", 1)
    assert await scene.registry.is_adopted(vm_id)  # a stop leaves the manager's domain


async def test_a_move_to_another_host_raises_the_epoch_once_the_old_host_let_go(
    scene: Scene,
) -> None:
    vm_id = await register(scene)
    await claim(scene, vm_id, "host-a")

    moved = await claim(scene, vm_id, "host-b")

    # host-a's last heartbeat listed no VMs: it no longer holds the domain.
    assert (moved.outcome, moved.epoch, moved.previous_host) == (ClaimOutcome.MOVED, 2, "host-a")


async def test_a_claim_sent_by_another_hosts_user_is_refused(scene: Scene) -> None:
    vm_id = await register(scene)

    refused = await claim(scene, vm_id, "host-a", sender="host-b")

    assert refused.outcome is ClaimOutcome.REFUSED
    assert refused.reason is not None
    assert "host-b" in refused.reason
    assert (await scene.registry.placement(vm_id)).host is None
