"""Policy's handlers on the in-memory bus double, against a real Redis: approval reads the
cluster from the hosts' heartbeats, answers the caller, and tells everyone (``tpm.approved``
or ``tpm.rejected`` with every reason); the approved VM is listed by the ``vms.list`` query
the CLI uses. The same services run on the real broker in test_policy_workflows and in
shared_stack/."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest_asyncio

from keeper_policy.app import build_service
from keeper_policy.service import PolicyService
from keeper_policy.settings import PolicySettings
from keeper_shared.bus.client import Delivery, Route
from keeper_shared.bus.topology import (
    POLICY,
    POLICY_COMMANDS,
    POLICY_EVENTS,
    STATE_STORE,
    QueueSpec,
)
from keeper_shared.messages.envelope import Envelope
from keeper_shared.messages.host import HostCapabilities, HostHeartbeat
from keeper_shared.messages.placement import PlaceVm
from keeper_shared.messages.queries import ListVms, VmsListed
from keeper_shared.messages.replies import EnableTpmReply, PlaceVmReply
from keeper_shared.messages.state import StatePersisted
from keeper_shared.messages.tpm import EnableTpm, TpmApproved, TpmRejected, VmSpec
from keeper_shared.messages.tpm_reset import (
    ResetClearing,
    ResetFoundBy,
    TpmReset,
    TpmResetCleared,
)
from keeper_shared.messages.types import FencingToken, StateKind
from support.memory_bus import MemoryBroker, MemoryBus
from support.redis_db import PrivateDatabase
from support.waiting import wait_until

TIMEOUT_S = 30.0
"""Generous: against hangs only."""

OBSERVER = QueueSpec(name="test.observer", event_bindings=("tpm.*.*",))


@dataclass
class Scene:
    broker: MemoryBroker
    service: PolicyService
    caller: MemoryBus
    facts: list[Any]


@pytest_asyncio.fixture
async def scene(private_redis: PrivateDatabase) -> AsyncIterator[Scene]:
    broker = MemoryBroker()
    settings = PolicySettings(amqp_url="amqp://unused/", redis_url=private_redis.url)
    bus = broker.client(source="policy/t", origin=POLICY)
    service = build_service(settings, private_redis.client, bus)
    await bus.consume(POLICY_EVENTS, service.event_routes(), prefetch=32)
    await bus.consume(POLICY_COMMANDS, service.command_routes(), prefetch=16)
    facts: list[Any] = []

    async def observe(envelope: Envelope[Any], _: Delivery) -> None:
        facts.append(envelope.data)

    observer = broker.client(source="automation/t", origin="automation")
    routes = [Route(TpmApproved, observe), Route(TpmRejected, observe)]
    await observer.consume(OBSERVER, routes, prefetch=8)
    try:
        yield Scene(broker, service, observer, facts)
    finally:
        await service.close()


async def beat(
    broker: MemoryBroker,
    host: str,
    swtpm: str | None,
    *,
    architectures: tuple[str, ...] = ("x86_64",),
    uefi_firmware: bool = True,
    libtpms: str | None = None,
) -> None:
    capabilities = HostCapabilities(
        swtpm_version=swtpm,
        libtpms_version=libtpms,
        libvirt_version="9.0.0",
        architectures=list(architectures),
        uefi_firmware=uefi_firmware,
    )
    bus = broker.client(source=f"host-agent/{host}", origin=host)
    await bus.publish_event(
        HostHeartbeat(host=host, interval_s=5.0, capabilities=capabilities, vms=[]), subject=host
    )
    await broker.settled()


def windows_11(name: str) -> VmSpec:
    return VmSpec(vm_id=str(uuid.uuid4()), name=name, guest_os="windows-11")


async def enable(
    scene: Scene, spec: VmSpec, *, allow_duplicate_name: bool = False
) -> EnableTpmReply:
    request = EnableTpm(spec=spec, allow_duplicate_name=allow_duplicate_name)
    reply = await scene.caller.call(
        POLICY, request, EnableTpmReply, subject=spec.vm_id, timeout_s=TIMEOUT_S
    )
    return reply.data


async def test_a_tpm_is_approved_on_a_cluster_whose_hosts_run_swtpm(scene: Scene) -> None:
    await beat(scene.broker, "host-a", swtpm="0.7.1")
    spec = windows_11("win-01")

    done = await enable(scene, spec)

    assert done.ok, done.error
    await wait_until(lambda: bool(scene.facts), "tpm.approved", timeout_s=TIMEOUT_S)
    (approved,) = scene.facts
    assert isinstance(approved, TpmApproved)
    assert approved.vm_id == spec.vm_id
    assert "tpm-crb" in approved.tpm_xml
    listed = await scene.caller.call(
        POLICY, ListVms(vm="win-01"), VmsListed, subject="win-01", timeout_s=TIMEOUT_S
    )
    assert [vm.vm_id for vm in listed.data.vms] == [spec.vm_id]


async def test_a_second_vm_of_one_name_is_refused_unless_asked_for(scene: Scene) -> None:
    """A name should name one VM: a second registration under it is refused, naming the
    first; approving the same VM again is not a second one; asked for, it is allowed."""
    await beat(scene.broker, "host-a", swtpm="0.7.1")
    first = windows_11("win-twin")
    assert (await enable(scene, first)).ok

    second = windows_11("win-twin")
    refused = await enable(scene, second)
    assert not refused.ok
    assert refused.error is not None
    assert first.vm_id in refused.error
    assert "allow_duplicate_name" in refused.error

    assert (await enable(scene, first.model_copy(update={"memory_mib": 512}))).ok
    assert (await enable(scene, second, allow_duplicate_name=True)).ok
    listed = await scene.caller.call(
        POLICY, ListVms(vm="win-twin"), VmsListed, subject="win-twin", timeout_s=TIMEOUT_S
    )
    assert sorted(vm.vm_id for vm in listed.data.vms) == sorted([first.vm_id, second.vm_id])


async def test_a_cluster_with_a_host_without_swtpm_is_refused_with_the_reason(
    scene: Scene,
) -> None:
    await beat(scene.broker, "host-a", swtpm="0.7.1")
    await beat(scene.broker, "host-b", swtpm=None)
    spec = windows_11("win-02")

    done = await enable(scene, spec)

    assert not done.ok
    assert done.error is not None
    assert "host-b" in done.error
    await wait_until(lambda: bool(scene.facts), "tpm.rejected", timeout_s=TIMEOUT_S)
    (rejected,) = scene.facts
    assert isinstance(rejected, TpmRejected)
    assert any("host-b" in reason for reason in rejected.reasons)


async def test_a_refused_placement_lists_every_reason_and_leaves_the_vm_where_it_was(
    scene: Scene,
) -> None:
    await beat(scene.broker, "host-a", swtpm="0.7.1")
    spec = windows_11("win-03")
    assert (await enable(scene, spec)).ok
    # An Arm host without swtpm or UEFI firmware: three reasons against an x86_64 UEFI VM.
    await beat(scene.broker, "arm-1", swtpm=None, architectures=("aarch64",), uefi_firmware=False)

    reply = await scene.caller.call(
        POLICY,
        PlaceVm(vm_id=spec.vm_id, host="arm-1"),
        PlaceVmReply,
        subject=spec.vm_id,
        timeout_s=TIMEOUT_S,
    )

    assert not reply.data.ok
    assert reply.data.error is not None
    assert reply.data.error.split("; ") == [
        "host arm-1 has no swtpm",
        "host arm-1 runs aarch64, not the VM's x86_64",
        "host arm-1 has no UEFI firmware (OVMF/AAVMF) for the VM's UEFI boot",
    ]
    listed = await scene.caller.call(
        POLICY, ListVms(vm="win-03"), VmsListed, subject="win-03", timeout_s=TIMEOUT_S
    )
    (vm,) = listed.data.vms
    assert (vm.host, vm.epoch, vm.last_host) == (None, 0, None)


async def _listed(scene: Scene, vm_id: str) -> tuple[str | None, int | None]:
    listed = await scene.caller.call(
        POLICY, ListVms(vm=vm_id), VmsListed, subject=vm_id, timeout_s=TIMEOUT_S
    )
    (view,) = listed.data.vms
    return view.tpm_reset, view.tpm_reset_version


async def test_a_tpm_reset_is_shown_until_it_ends_whatever_order_the_events_come_in(
    scene: Scene,
) -> None:
    await beat(scene.broker, "host-a", swtpm="0.7.1")
    spec = windows_11("win-reset")
    assert (await enable(scene, spec)).ok
    store = scene.broker.client(source="state-store/t", origin=STATE_STORE)

    async def publish(event: TpmReset | TpmResetCleared) -> None:
        await store.publish_event(event, subject=spec.vm_id)
        await scene.broker.settled()

    def reset(version: int, found_by: ResetFoundBy = ResetFoundBy.PERSIST) -> TpmReset:
        return TpmReset(
            vm_id=spec.vm_id, version=version, previous_good_version=version - 1, found_by=found_by
        )

    def cleared(version: int) -> TpmResetCleared:
        return TpmResetCleared(
            vm_id=spec.vm_id, version=version, how=ResetClearing.ACCEPTED, reset_version=3
        )

    await publish(reset(3))
    text, version = await _listed(scene, spec.vm_id)
    assert version == 3
    assert text is not None
    assert "v2, restored next" in text
    await publish(reset(3))  # redelivered: the same flag
    assert (await _listed(scene, spec.vm_id))[1] == 3

    await publish(cleared(5))
    assert await _listed(scene, spec.vm_id) == (None, None)
    # A late reset the end already covers (the scrubber judging v4 afterwards) stays over.
    await publish(reset(4, ResetFoundBy.SCRUB))
    assert await _listed(scene, spec.vm_id) == (None, None)
    await publish(reset(7))
    assert (await _listed(scene, spec.vm_id))[1] == 7


async def test_a_host_whose_libtpms_cannot_load_the_vms_tpm_state_format_is_refused(
    scene: Scene,
) -> None:
    """The store read the profile of the VM's newest TPM state (libtpms 0.10's default-v1,
    StateFormatLevel 7): a host with libtpms 0.9 cannot load it, one with 0.10 can."""
    await beat(scene.broker, "host-a", swtpm="0.7.1", libtpms="0.10.2")
    spec = windows_11("win-profile")
    assert (await enable(scene, spec)).ok
    store = scene.broker.client(source="state-store/t", origin="state-store")
    await store.publish_event(
        StatePersisted(
            vm_id=spec.vm_id,
            kind=StateKind.TPM,
            content_hash="ab" * 32,
            size=4096,
            token=FencingToken(epoch=1, generation=1),
            version=1,
            host="host-a",
            tpm_profile="default-v1",
            state_format_level=7,
        ),
        subject=spec.vm_id,
    )
    await scene.broker.settled()
    await beat(scene.broker, "old-1", swtpm="0.7.1", libtpms="0.9.2", uefi_firmware=False)
    await beat(scene.broker, "new-1", swtpm="0.7.1", libtpms="0.10.2", uefi_firmware=False)

    async def refusals(host: str) -> list[str]:
        reply = await scene.caller.call(
            POLICY,
            PlaceVm(vm_id=spec.vm_id, host=host),
            PlaceVmReply,
            subject=spec.vm_id,
            timeout_s=TIMEOUT_S,
        )
        assert not reply.data.ok
        assert reply.data.error is not None
        return reply.data.error.split("; ")

    assert await refusals("old-1") == [
        "host old-1 has no UEFI firmware (OVMF/AAVMF) for the VM's UEFI boot",
        "host old-1 runs libtpms 0.9.2, which loads up to StateFormatLevel 1, but the VM's TPM "
        "state (libtpms profile default-v1) needs StateFormatLevel 7",
    ]
    assert await refusals("new-1") == [
        "host new-1 has no UEFI firmware (OVMF/AAVMF) for the VM's UEFI boot"
    ]
