"""Templates end to end through policy and the state store, both real, on the in-memory bus
double against a real Redis: a template made from a VM holds that VM's NVRAM and no TPM;
a VM made from it is approved, listed, and its start is handed that NVRAM and no TPM state
(so swtpm manufactures a new TPM); a template is not a VM and cannot be placed; deleting
one removes its NVRAM copy and leaves the VMs made from it theirs."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest_asyncio
from redis.asyncio import Redis

from keeper_policy.app import build_service
from keeper_policy.service import PolicyService
from keeper_policy.settings import PolicySettings
from keeper_policy.storage.scripts import PolicyScripts
from keeper_policy.templates.records import TemplateRecords
from keeper_shared.bus.client import Route
from keeper_shared.bus.topology import (
    POLICY,
    POLICY_COMMANDS,
    POLICY_EVENTS,
    STATE_STORE,
    STATE_STORE_COMMANDS,
    host_command_queue,
)
from keeper_shared.messages.commands import ReplyT
from keeper_shared.messages.host import HostCapabilities, HostHeartbeat
from keeper_shared.messages.placement import PlaceVm
from keeper_shared.messages.queries import ListVms, VmsListed
from keeper_shared.messages.replies import (
    CreateVmFromTemplateReply,
    DeleteTemplateReply,
    EnableTpmReply,
    PlaceVmReply,
    RestoreStateReply,
)
from keeper_shared.messages.state import FetchState, RestoreState
from keeper_shared.messages.template import (
    CreateTemplate,
    CreateVmFromTemplate,
    DeleteTemplate,
    ListTemplates,
    TemplateCreated,
    TemplatesListed,
    TemplateView,
)
from keeper_shared.messages.tpm import EnableTpm, VmSpec
from keeper_shared.messages.types import FencingToken, StateKind
from keeper_shared.messages.vm import PrepareVm
from keeper_shared.messages.vm_hardware import DiskSpec
from keeper_shared.redis_access.keys import placement_key
from keeper_shared.redis_access.results import awaited
from keeper_shared.state_format.blobs import open_blob
from keeper_shared.state_format.tpm_archive import MAIN_STATE_FILE_NAME, pack_tpm_state
from keeper_state_store.crypto.encryption import KeyEncryptionKey
from keeper_state_store.crypto.key_ring import KeyRing
from keeper_state_store.handlers.deletion import DeletionService
from keeper_state_store.handlers.state import StateService
from keeper_state_store.handlers.transfer import TransferService
from keeper_state_store.settings import StateStoreSettings
from keeper_state_store.storage.repository import StateRepository
from keeper_state_store.storage.version_reader import VersionReader
from keeper_state_store.transfer.moving import read_newest
from support.in_process_store import FakeHost, prepared_content
from support.memory_bus import MemoryBroker, MemoryBus
from support.redis_db import PrivateDatabase
from support.sealing_keys import register_host, store_sealing

HOST = "host-a"
TIMEOUT_S = 30.0
"""Generous: against hangs only."""


@dataclass
class Scene:
    broker: MemoryBroker
    policy: PolicyService
    store: StateService
    repository: StateRepository
    host: FakeHost
    caller: MemoryBus
    redis: Redis

    async def ask(
        self,
        payload: EnableTpm | CreateVmFromTemplate | DeleteTemplate | PlaceVm,
        reply_type: type[ReplyT],
    ) -> ReplyT:
        reply = await self.caller.call(
            POLICY, payload, reply_type, subject="test", timeout_s=TIMEOUT_S
        )
        return reply.data

    async def create_template(self, request: CreateTemplate) -> TemplateCreated:
        reply = await self.caller.call(
            POLICY, request, TemplateCreated, subject=request.name, timeout_s=TIMEOUT_S
        )
        return reply.data

    async def templates(self) -> list[TemplateView]:
        reply = await self.caller.call(
            POLICY, ListTemplates(), TemplatesListed, subject="t", timeout_s=TIMEOUT_S
        )
        return reply.data.templates

    async def vm_ids(self) -> set[str]:
        reply = await self.caller.call(
            POLICY, ListVms(), VmsListed, subject="t", timeout_s=TIMEOUT_S
        )
        return {vm.vm_id for vm in reply.data.vms}

    async def stored(self, vm_id: str) -> dict[StateKind, bytes]:
        """What the store holds of ``vm_id`` now, verified and opened."""
        reader = VersionReader(self.repository.redis, self.repository.keys)
        newest = await read_newest(self.repository, reader, vm_id, list(StateKind))
        return {kind: open_blob(verified.blob) for kind, verified in newest.items()}


@pytest_asyncio.fixture
async def scene(private_redis: PrivateDatabase, kek: KeyEncryptionKey) -> AsyncIterator[Scene]:
    broker = MemoryBroker()
    redis = private_redis.client
    policy_bus = broker.client(source="policy/t", origin=POLICY)
    policy = build_service(
        PolicySettings(amqp_url="amqp://unused/", redis_url=private_redis.url), redis, policy_bus
    )
    await policy_bus.consume(POLICY_EVENTS, policy.event_routes(), prefetch=32)
    await policy_bus.consume(POLICY_COMMANDS, policy.command_routes(), prefetch=16)
    repository = StateRepository(redis, KeyRing(kek), history_depth=10)
    store_bus = broker.client(source="state-store/t", origin=STATE_STORE)
    sealing = store_sealing(redis)
    store = StateService(
        StateStoreSettings(
            amqp_url="amqp://unused/",
            redis_url=private_redis.url,
            kek_file=Path("/nonexistent/kek"),
            sealing_key_file=Path("/nonexistent/sealing"),  # keys handed over directly
            allow_volatile_redis=True,
            fetch_timeout_s=10.0,
        ),
        repository,
        store_bus,
        sealing,
    )
    routes = [
        *store.command_routes(),
        *TransferService(repository, sealing.own).command_routes(),
        *DeletionService(repository, store_bus).command_routes(),
    ]
    await store_bus.consume(STATE_STORE_COMMANDS, routes, prefetch=8)
    host = FakeHost(
        host_id=HOST,
        bus=broker.client(source=f"host-agent/{HOST}", origin=HOST),
        store_key=sealing.own.public,
    )
    await register_host(sealing, HOST, host.keys.public)
    host_routes = [Route(FetchState, host.on_fetch), Route(PrepareVm, host.on_prepare)]
    await host.bus.consume(host_command_queue(HOST), host_routes, prefetch=8)
    beat = HostHeartbeat(
        host=HOST,
        interval_s=5.0,
        capabilities=HostCapabilities(
            swtpm_version="0.8.2",
            libvirt_version="9.0.0",
            architectures=["x86_64"],
            uefi_firmware=True,
        ),
        vms=[],
    )
    await host.bus.publish_event(beat, subject=HOST)
    await broker.settled()
    caller = broker.client(source="automation/t", origin="automation")
    try:
        yield Scene(broker, policy, store, repository, host, caller, redis)
    finally:
        await policy.close()
        await store.close()


async def a_vm_that_ran(scene: Scene, name: str) -> tuple[VmSpec, bytes, bytes]:
    """A registered Secure Boot VM (with a disk) whose TPM and NVRAM the store holds, as
    after a run on HOST; its spec, TPM and NVRAM content."""
    disk = DiskSpec(source=f"/var/lib/libvirt/images/{name}.qcow2")
    spec = VmSpec(
        vm_id=str(uuid.uuid4()),
        name=name,
        guest_os="windows-11",
        secure_boot=True,
        memory_mib=4096,
        disks=[disk],
    )
    assert (await scene.ask(EnableTpm(spec=spec), EnableTpmReply)).ok
    await awaited(scene.redis.hset(placement_key(spec.vm_id), mapping={"host": HOST, "epoch": 1}))
    tpm = pack_tpm_state({MAIN_STATE_FILE_NAME: os.urandom(512)})
    nvram = b"enrolled secure boot keys " + os.urandom(64)
    token = FencingToken(epoch=1, generation=1)
    scene.host.hold(spec.vm_id, StateKind.TPM, tpm, token)
    scene.host.hold(spec.vm_id, StateKind.NVRAM, nvram, token)
    failures = await scene.store.pull_and_persist(HOST, [spec.vm_id], list(StateKind))
    assert failures[spec.vm_id] is None, failures
    assert set(await scene.stored(spec.vm_id)) == {StateKind.TPM, StateKind.NVRAM}
    return spec, tpm, nvram


async def test_a_template_from_a_vm_gives_its_vms_its_nvram_and_a_new_tpm(scene: Scene) -> None:
    source, _, nvram = await a_vm_that_ran(scene, "win-golden")
    template_id = str(uuid.uuid4())

    created = await scene.create_template(
        CreateTemplate(template_id=template_id, name="win11-base", from_vm_id=source.vm_id)
    )

    assert created.error is None
    template = created.template
    assert template is not None
    assert (template.nvram, template.source_vm_id) == (True, source.vm_id)
    assert template.spec.secure_boot
    assert template.spec.memory_mib == 4096
    assert template.spec.disks == []  # an image file is one VM's
    assert await scene.stored(template_id) == {StateKind.NVRAM: nvram}  # and no TPM
    assert [t.name for t in await scene.templates()] == ["win11-base"]
    assert template_id not in await scene.vm_ids()

    vm_id = str(uuid.uuid4())
    made = await scene.ask(
        CreateVmFromTemplate(template_id=template_id, vm_id=vm_id, name="desk-01"),
        CreateVmFromTemplateReply,
    )

    assert made.ok, made.error
    assert made.nvram_copied
    assert "tpm-crb" in (made.tpm_xml or "")
    assert vm_id in await scene.vm_ids()
    assert await scene.stored(vm_id) == {StateKind.NVRAM: nvram}
    # What its first start is handed: the template's NVRAM, and no TPM state.
    restore = RestoreState(vm_id=vm_id, name="desk-01", host=HOST, epoch=1)
    started = await scene.caller.call(
        STATE_STORE, restore, RestoreStateReply, subject=vm_id, timeout_s=TIMEOUT_S
    )
    assert started.data.ok, started.data.error
    prepare = scene.host.last_prepared(vm_id)
    assert prepare.tpm is None
    assert prepared_content(prepare, StateKind.NVRAM) == nvram


async def test_a_template_cannot_be_placed(scene: Scene) -> None:
    spec = VmSpec(vm_id=str(uuid.uuid4()), name="x", guest_os="rhel-9.2", secure_boot=True)
    template_id = str(uuid.uuid4())
    created = await scene.create_template(
        CreateTemplate(template_id=template_id, name="rhel9", spec=spec)
    )
    assert created.template is not None
    assert not created.template.nvram

    refused = await scene.ask(PlaceVm(vm_id=template_id, host=HOST), PlaceVmReply)

    assert not refused.ok
    assert refused.error is not None
    assert "template 'rhel9'" in refused.error
    assert "cannot be started" in refused.error
    assert await scene.stored(template_id) == {}


async def test_a_vm_from_a_spec_template_has_nothing_stored_and_its_own_spec(
    scene: Scene,
) -> None:
    spec = VmSpec(vm_id=str(uuid.uuid4()), name="x", guest_os="rhel-9.2", vcpus=2)
    template_id = str(uuid.uuid4())
    await scene.create_template(CreateTemplate(template_id=template_id, name="rhel9", spec=spec))
    vm_id = str(uuid.uuid4())

    made = await scene.ask(
        CreateVmFromTemplate(template_id=template_id, vm_id=vm_id, name="web-01"),
        CreateVmFromTemplateReply,
    )

    assert made.ok, made.error
    assert not made.nvram_copied
    assert await scene.stored(vm_id) == {}  # the firmware's own NVRAM, a new TPM


async def test_a_rejected_vm_keeps_no_copy_of_the_templates_nvram(scene: Scene) -> None:
    """The NVRAM is copied before the approval (so a VM is never registered without it);
    a rejection deletes that copy again."""
    source, _, _ = await a_vm_that_ran(scene, "win-golden")
    template_id = str(uuid.uuid4())
    await scene.create_template(
        CreateTemplate(template_id=template_id, name="win11-base", from_vm_id=source.vm_id)
    )
    vm_id = str(uuid.uuid4())

    # No live host in that cluster runs swtpm: the approval rules refuse.
    refused = await scene.ask(
        CreateVmFromTemplate(template_id=template_id, vm_id=vm_id, name="d2", cluster="empty"),
        CreateVmFromTemplateReply,
    )

    assert not refused.ok
    assert vm_id not in await scene.vm_ids()
    assert await scene.stored(vm_id) == {}


async def test_a_template_needs_its_vms_nvram_and_a_name_of_its_own(scene: Scene) -> None:
    never_ran = VmSpec(vm_id=str(uuid.uuid4()), name="fresh", guest_os="windows-11")
    assert (await scene.ask(EnableTpm(spec=never_ran), EnableTpmReply)).ok
    template_id = str(uuid.uuid4())

    refused = await scene.create_template(
        CreateTemplate(template_id=template_id, name="t", from_vm_id=never_ran.vm_id)
    )

    assert refused.template is None
    assert refused.error is not None
    assert "no stored nvram" in refused.error
    assert await scene.templates() == []
    ok = await scene.create_template(
        CreateTemplate(template_id=template_id, name="t", spec=never_ran)
    )
    assert ok.template is not None
    again = await scene.create_template(
        CreateTemplate(template_id=str(uuid.uuid4()), name="t", spec=never_ran)
    )
    assert again.error is not None
    assert "exists" in again.error


async def test_deleting_a_template_removes_its_nvram_not_its_vms(scene: Scene) -> None:
    source, _, nvram = await a_vm_that_ran(scene, "win-golden")
    template_id = str(uuid.uuid4())
    await scene.create_template(
        CreateTemplate(template_id=template_id, name="win11-base", from_vm_id=source.vm_id)
    )
    vm_id = str(uuid.uuid4())
    made = await scene.ask(
        CreateVmFromTemplate(template_id=template_id, vm_id=vm_id, name="d1"),
        CreateVmFromTemplateReply,
    )
    assert made.ok, made.error

    deleted = await scene.ask(DeleteTemplate(template_id=template_id), DeleteTemplateReply)

    assert deleted.ok, deleted.error
    assert deleted.nvram_versions == 1
    assert await scene.templates() == []
    assert await scene.stored(template_id) == {}
    assert await scene.stored(vm_id) == {StateKind.NVRAM: nvram}
    again = await scene.ask(DeleteTemplate(template_id=template_id), DeleteTemplateReply)
    assert not again.ok
    assert again.error is not None
    assert "no template" in again.error


async def test_of_two_templates_saved_under_one_name_only_the_first_is_recorded(
    scene: Scene,
) -> None:
    """Two replicas creating two templates of one name at once: the name check before the
    NVRAM copy passes for both, the one-step save lets only one through."""
    records = TemplateRecords(scene.redis, PolicyScripts(scene.redis))
    spec = VmSpec(vm_id=str(uuid.uuid4()), name="x", guest_os="rhel-9.2")
    first, second = (
        TemplateView(
            template_id=template_id,
            name="shared",
            spec=spec,
            source_vm_id=None,
            nvram=False,
            created_at=datetime.now(UTC),
        )
        for template_id in (str(uuid.uuid4()), str(uuid.uuid4()))
    )

    assert await records.save(first) is None
    assert await records.save(first) is None  # a repeat is no conflict
    assert await records.save(second) == first.template_id

    assert [t.template_id for t in await scene.templates()] == [first.template_id]
    assert await records.template(second.template_id) is None
