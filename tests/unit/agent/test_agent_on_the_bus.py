"""The host agent's handlers on the in-memory bus double: what libvirt reports reaches policy
as facts, and commands from policy are answered over the bus as the real broker carries them
(no broker, no libvirt: a fake hypervisor and `support.memory_bus`)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from keeper_host_agent.agent import HostAgent
from keeper_host_agent.hypervisor.port import LifecycleEvent
from keeper_host_agent.settings import HostAgentSettings
from keeper_shared.bus.client import Delivery, Route
from keeper_shared.bus.topology import POLICY_EVENTS, host_command_key, host_command_queue
from keeper_shared.domain_metadata import PLACEMENT_NAMESPACE
from keeper_shared.messages.envelope import Envelope
from keeper_shared.messages.replies import SetPlacementEpochReply
from keeper_shared.messages.state import FetchState, StateFetched
from keeper_shared.messages.types import StateKind
from keeper_shared.messages.vm import StopReason, VmStarted, VmStopped
from keeper_shared.messages.vm_control import SetPlacementEpoch
from support.fake_hypervisor import FakeDomain, FakeHypervisor
from support.memory_bus import MemoryBroker, MemoryMessage
from support.sealing_keys import new_keys
from support.waiting import wait_until

HOST = "host-a"


@pytest.fixture
def vm_id() -> str:
    return str(uuid.uuid4())


@pytest.fixture
def broker() -> MemoryBroker:
    return MemoryBroker()


@pytest.fixture
def hypervisor(vm_id: str) -> FakeHypervisor:
    return FakeHypervisor(FakeDomain(vm_id, "web-01"))


@pytest.fixture
def agent(broker: MemoryBroker, hypervisor: FakeHypervisor, tmp_path: Path) -> Iterator[HostAgent]:
    settings = HostAgentSettings(
        host_id=HOST,
        libvirt_uri="test:///unused",
        sealing_key_file=tmp_path / "host-sealing.key",
        store_sealing_key=new_keys().public.to_text(),
    )
    bus = broker.client(source=f"host-agent/{HOST}", origin=HOST)
    agent = HostAgent(settings, bus, hypervisor)
    try:
        yield agent
    finally:
        agent.watcher.close()


class PolicyEvents:
    """What policy's events queue receives."""

    def __init__(self) -> None:
        self.facts: list[tuple[Any, str | None]] = []

    async def record(self, envelope: Envelope[Any], delivery: Delivery) -> None:
        self.facts.append((envelope.data, delivery.user_id))


@pytest.fixture
async def policy_events(broker: MemoryBroker) -> PolicyEvents:
    events = PolicyEvents()
    policy = broker.client(source="policy/test", origin="policy")
    routes = [Route(VmStarted, events.record), Route(VmStopped, events.record)]
    await policy.consume(POLICY_EVENTS, routes, prefetch=8)
    return events


async def test_a_stop_libvirt_reports_reaches_policy_as_a_fact_from_this_host(
    agent: HostAgent, policy_events: PolicyEvents, vm_id: str
) -> None:
    agent.on_lifecycle(LifecycleEvent(vm_id, "web-01", "stopped", StopReason.SHUTDOWN))
    await wait_until(lambda: bool(policy_events.facts), "the fact at policy", timeout_s=10)
    ((fact, user),) = policy_events.facts
    assert isinstance(fact, VmStopped)
    assert (fact.vm_id, fact.host, fact.reason) == (vm_id, HOST, StopReason.SHUTDOWN)
    assert user == HOST


async def test_policy_sets_the_placement_epoch_over_the_bus(
    agent: HostAgent, broker: MemoryBroker, hypervisor: FakeHypervisor, vm_id: str
) -> None:
    await agent.bus.consume(host_command_queue(HOST), agent.routes(), prefetch=8)
    policy = broker.client(source="policy/test", origin="policy")

    reply = await policy.call(
        host_command_key(HOST),
        SetPlacementEpoch(vm_id=vm_id, epoch=3),
        SetPlacementEpochReply,
        subject=vm_id,
        timeout_s=10,
        replier=HOST,
    )

    assert reply.data.ok, reply.data.error
    assert "3" in hypervisor.domains[vm_id].metadata[PLACEMENT_NAMESPACE]


async def test_a_fetch_of_a_vm_this_host_does_not_track_names_it_missing(
    agent: HostAgent, broker: MemoryBroker, vm_id: str
) -> None:
    await agent.bus.consume(host_command_queue(HOST), agent.routes(), prefetch=8)
    store = broker.client(source="state-store/test", origin="state-store")

    reply = await store.call(
        host_command_key(HOST),
        FetchState(vm_ids=[vm_id], kinds=[StateKind.TPM, StateKind.NVRAM]),
        StateFetched,
        subject=HOST,
        timeout_s=10,
        replier=HOST,
    )

    assert reply.data.missing == [vm_id]
    assert reply.data.vms == []


async def test_a_command_the_agent_cannot_decode_is_dead_lettered_not_retried(
    agent: HostAgent, broker: MemoryBroker
) -> None:
    commands = host_command_queue(HOST)
    await agent.bus.consume(commands, agent.routes(), prefetch=8)

    bad = MemoryMessage(body=b'{"type": "vm.set-epoch", "data": {"epoch": "x"}}')
    broker.publish_command(host_command_key(HOST), bad)
    await broker.settled()

    assert len(broker.dead_lettered(commands)) == 1
    assert len(broker.queue(commands).handled) == 1
