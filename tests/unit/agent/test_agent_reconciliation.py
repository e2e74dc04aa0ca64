"""What the host agent reports when it reads every domain again (start-up, libvirt
reconnect) and when a domain it did not place appears: the facts it missed, and
`vm.discovered` for domains vTPM Keeper did not place. On the in-memory bus with a fake
hypervisor."""

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
from keeper_shared.bus.topology import POLICY_EVENTS
from keeper_shared.domain_metadata import PLACEMENT_NAMESPACE
from keeper_shared.messages.adoption import AdoptionMode, VmDiscovered
from keeper_shared.messages.envelope import Envelope
from keeper_shared.messages.tpm import Firmware
from keeper_shared.messages.vm import StopReason, VmDefined, VmStarted, VmStopped, VmUndefined
from support.fake_hypervisor import FakeDomain, FakeHypervisor
from support.memory_bus import MemoryBroker
from support.sealing_keys import new_keys
from support.waiting import wait_until

HOST = "host-r"


def tpm_domain(vm_id: str, name: str, *, epoch: int = 0) -> FakeDomain:
    placement = (
        f"<keeper:placement xmlns:keeper='{PLACEMENT_NAMESPACE}' epoch='{epoch}'/>" if epoch else ""
    )
    xml = f"""<domain type='qemu'><name>{name}</name><uuid>{vm_id}</uuid>
      <metadata>{placement}</metadata><memory unit='MiB'>2048</memory>
      <os><type arch='x86_64' machine='q35'>hvm</type>
        <loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE_4M.fd</loader></os>
      <devices><tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm></devices>
    </domain>"""
    return FakeDomain(vm_id, name, xml)


class PolicyEvents:
    """What policy's events queue receives, in order."""

    def __init__(self) -> None:
        self.facts: list[Any] = []

    async def record(self, envelope: Envelope[Any], delivery: Delivery) -> None:
        self.facts.append(envelope.data)

    def of(self, kind: type[Any]) -> list[Any]:
        return [fact for fact in self.facts if isinstance(fact, kind)]


@pytest.fixture
def broker() -> MemoryBroker:
    return MemoryBroker()


@pytest.fixture
async def policy_events(broker: MemoryBroker) -> PolicyEvents:
    events = PolicyEvents()
    policy = broker.client(source="policy/test", origin="policy")
    kinds = (VmDiscovered, VmStopped, VmStarted, VmUndefined, VmDefined)
    await policy.consume(POLICY_EVENTS, [Route(k, events.record) for k in kinds], prefetch=8)
    return events


@pytest.fixture
def hypervisor() -> FakeHypervisor:
    return FakeHypervisor()


@pytest.fixture
def agent(broker: MemoryBroker, hypervisor: FakeHypervisor, tmp_path: Path) -> Iterator[HostAgent]:
    settings = HostAgentSettings(
        host_id=HOST,
        libvirt_uri="test:///unused",
        swtpm_root=tmp_path / "swtpm",
        nvram_dir=tmp_path / "nvram",
        adopt=AdoptionMode.MARKED,
        sealing_key_file=tmp_path / "host-sealing.key",
        store_sealing_key=new_keys().public.to_text(),
    )
    agent = HostAgent(settings, broker.client(source=f"host-agent/{HOST}", origin=HOST), hypervisor)
    try:
        yield agent
    finally:
        agent.watcher.close()


async def test_start_up_reports_unplaced_domains_and_placed_ones_found_off(
    agent: HostAgent, hypervisor: FakeHypervisor, broker: MemoryBroker, policy_events: PolicyEvents
) -> None:
    foreign, placed_off, placed_on = (str(uuid.uuid4()) for _ in range(3))
    hypervisor.domains[foreign] = tpm_domain(foreign, "foreign")
    off = tpm_domain(placed_off, "placed-off", epoch=3)
    off.active = False
    hypervisor.domains[placed_off] = off
    hypervisor.domains[placed_on] = tpm_domain(placed_on, "placed-on", epoch=2)

    await agent.rebuild_view()
    await broker.settled()

    (found,) = policy_events.of(VmDiscovered)
    assert (found.vm_id, found.host, found.name, found.running) == (foreign, HOST, "foreign", True)
    assert (found.adoption, found.marked) == (AdoptionMode.MARKED, False)
    assert (found.spec.firmware, found.spec.memory_mib, found.spec.tpm_emulated) == (
        Firmware.UEFI,
        2048,
        True,
    )
    (stopped,) = policy_events.of(VmStopped)
    assert (stopped.vm_id, stopped.reason, stopped.missed) == (
        placed_off,
        StopReason.UNKNOWN,
        True,
    )
    assert policy_events.of(VmStarted) == []


async def test_a_reconnect_reports_what_changed_while_libvirt_was_away(
    agent: HostAgent, hypervisor: FakeHypervisor, broker: MemoryBroker, policy_events: PolicyEvents
) -> None:
    stops, goes = str(uuid.uuid4()), str(uuid.uuid4())
    hypervisor.domains[stops] = tpm_domain(stops, "stops", epoch=1)
    hypervisor.domains[goes] = tpm_domain(goes, "goes", epoch=1)
    await agent.rebuild_view()
    await broker.settled()
    assert policy_events.facts == []

    await hypervisor.shutdown(stops, timeout_s=1)
    del hypervisor.domains[goes]
    await agent.rebuild_view()
    await broker.settled()

    assert [(type(f).__name__, f.vm_id) for f in policy_events.facts] == [
        ("VmStopped", stops),
        ("VmStopped", goes),
        ("VmUndefined", goes),
    ]
    assert policy_events.facts[0].reason is StopReason.SHUTDOWN
    assert all(fact.missed for fact in policy_events.of(VmStopped))

    # Read again with nothing changed: nothing more to say.
    await agent.rebuild_view()
    await broker.settled()
    assert len(policy_events.facts) == 3


async def test_a_domain_defined_by_another_manager_is_reported_when_it_appears(
    agent: HostAgent, hypervisor: FakeHypervisor, broker: MemoryBroker, policy_events: PolicyEvents
) -> None:
    await agent.rebuild_view()
    vm_id = str(uuid.uuid4())
    hypervisor.domains[vm_id] = tpm_domain(vm_id, "new-one")

    agent.on_lifecycle(LifecycleEvent(vm_id, "new-one", "defined", None))
    await wait_until(lambda: len(policy_events.facts) == 2, "both facts at policy", timeout_s=10)

    assert [type(fact).__name__ for fact in policy_events.facts] == ["VmDefined", "VmDiscovered"]


async def test_a_placed_domain_is_never_reported_as_discovered(
    agent: HostAgent, hypervisor: FakeHypervisor, broker: MemoryBroker, policy_events: PolicyEvents
) -> None:
    vm_id = str(uuid.uuid4())
    hypervisor.domains[vm_id] = tpm_domain(vm_id, "ours", epoch=4)
    await agent.rebuild_view()
    agent.on_lifecycle(LifecycleEvent(vm_id, "ours", "started", None))
    await wait_until(lambda: len(agent.lifecycle_tasks) == 0, "the event handled", timeout_s=10)
    await broker.settled()
    assert [type(fact).__name__ for fact in policy_events.facts] == ["VmStarted"]
