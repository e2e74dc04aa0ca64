"""A start with the VM manager's own domain XML, through the real policy, state store and
host agent on the in-memory bus double, against a real Redis and a simulated host
(libvirt's ``test:///`` driver): the host defines exactly the manager's domain (its disks,
interfaces, vCPUs and metadata) with the approved TPM, the NVRAM where the store restores
it and the placement epoch added; the definition is kept, so the next start uses it again
(while the VM runs, the same one is a repeat and another one is refused);
a conflicting definition is refused with every reason and changes nothing (no epoch raised,
no domain on the host, the kept definition as it was)."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio

from keeper_host_agent.agent import HostAgent
from keeper_host_agent.settings import HostAgentSettings
from keeper_policy.app import build_service
from keeper_policy.settings import PolicySettings
from keeper_shared.bus.topology import (
    POLICY,
    POLICY_COMMANDS,
    POLICY_EVENTS,
    STATE_STORE,
    STATE_STORE_COMMANDS,
    host_command_queue,
)
from keeper_shared.domain_metadata import PLACEMENT_NAMESPACE
from keeper_shared.messages.commands import ReplyT
from keeper_shared.messages.envelope import Payload
from keeper_shared.messages.host import HostCapabilities
from keeper_shared.messages.placement import PlaceVm, StopMode, StopVm
from keeper_shared.messages.replies import EnableTpmReply, PlaceVmReply, StopVmReply
from keeper_shared.messages.tpm import EnableTpm, VmSpec
from keeper_shared.redis_access.keys import hosts_key, placement_key, vm_record_key
from keeper_shared.redis_access.results import awaited
from keeper_state_store.crypto.encryption import KeyEncryptionKey
from keeper_state_store.crypto.key_ring import KeyRing
from keeper_state_store.handlers.state import StateService
from keeper_state_store.settings import StateStoreSettings
from keeper_state_store.storage.repository import StateRepository
from support.memory_bus import MemoryBroker, MemoryBus
from support.redis_db import PrivateDatabase
from support.sealing_keys import register_host, store_sealing
from support.waiting import wait_until

pytestmark = [pytest.mark.redis, pytest.mark.libvirt]

HOST = "host-m"
TIMEOUT_S = 30.0
"""Generous: against hangs only."""

NVRAM_DIR = "/var/lib/libvirt/qemu/nvram"
"""Where the manager's libvirt keeps NVRAM; the test host keeps it elsewhere."""

NOVA = "http://openstack.org/xmlns/libvirt/nova/1.1"
OSINFO = "http://libosinfo.org/xmlns/libvirt/domain/1.0"


def manager_xml(vm_id: str, name: str, *, tpm: str = "") -> str:
    """A domain as Nova or virt-install defines one: four vCPUs, two disks, two interfaces,
    its own metadata, UEFI with a path for the NVRAM, and no TPM unless given."""
    return f"""<domain type='qemu'>
  <name>{name}</name>
  <uuid>{vm_id}</uuid>
  <metadata>
    <nova:instance xmlns:nova='{NOVA}'><nova:name>web</nova:name></nova:instance>
    <libosinfo:libosinfo xmlns:libosinfo='{OSINFO}'>
      <libosinfo:os id='http://microsoft.com/win/11'/>
    </libosinfo:libosinfo>
  </metadata>
  <memory unit='MiB'>2048</memory>
  <vcpu>4</vcpu>
  <os>
    <type arch='x86_64' machine='pc-q35-7.2'>hvm</type>
    <loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE_4M.fd</loader>
    <nvram template='/usr/share/OVMF/OVMF_VARS_4M.fd'>{NVRAM_DIR}/{name}_VARS.fd</nvram>
  </os>
  <features><acpi/><smm state='on'/></features>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/var/lib/libvirt/images/{name}.qcow2'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='/var/lib/libvirt/images/{name}-data.raw'/>
      <target dev='vdb' bus='virtio'/>
    </disk>
    <interface type='network'>
      <mac address='52:54:00:6b:2f:01'/><source network='default'/><model type='virtio'/>
    </interface>
    <interface type='bridge'>
      <mac address='52:54:00:6b:2f:02'/><source bridge='br0'/><model type='e1000e'/>
    </interface>
    {tpm}
  </devices>
</domain>"""


@dataclass
class Scene:
    caller: MemoryBus
    agent: HostAgent
    redis_db: PrivateDatabase

    async def ask(self, payload: Payload, reply_type: type[ReplyT], subject: str) -> ReplyT:
        reply = await self.caller.call(
            POLICY, payload, reply_type, subject=subject, timeout_s=TIMEOUT_S
        )
        return reply.data

    async def enable(self) -> VmSpec:
        vm_id = str(uuid.uuid4())
        spec = VmSpec(vm_id=vm_id, name=f"web-{vm_id[:8]}", guest_os="windows-11")
        done = await self.ask(EnableTpm(spec=spec), EnableTpmReply, vm_id)
        assert done.ok, done.error
        return spec

    async def defined(self, vm_id: str) -> ET.Element | None:
        """The domain as the host's libvirt holds it."""
        snapshot = await self.agent.hypervisor.domain(vm_id)
        return None if snapshot is None else ET.fromstring(snapshot.xml)  # noqa: S314

    async def kept_definition(self, vm_id: str) -> str | None:
        """The definition policy keeps for the VM's later starts."""
        kept = await awaited(self.redis_db.client.hget(vm_record_key(vm_id), "domain_xml"))
        return kept.decode() if isinstance(kept, bytes) else kept

    async def placement(self, vm_id: str) -> tuple[str, int]:
        raw = await awaited(self.redis_db.client.hgetall(placement_key(vm_id)))
        return raw.get(b"host", b"").decode(), int(raw.get(b"epoch", 0))


@pytest_asyncio.fixture
async def scene(
    private_redis: PrivateDatabase, kek: KeyEncryptionKey, tmp_path: Path
) -> AsyncIterator[Scene]:
    broker = MemoryBroker()
    redis = private_redis.client
    policy_bus = broker.client(source="policy/t", origin=POLICY)
    policy = build_service(
        PolicySettings(amqp_url="amqp://unused/", redis_url=private_redis.url),
        redis,
        policy_bus,
    )
    await policy_bus.consume(POLICY_EVENTS, policy.event_routes(), prefetch=32)
    await policy_bus.consume(POLICY_COMMANDS, policy.command_routes(), prefetch=16)
    store_bus = broker.client(source="state-store/t", origin=STATE_STORE)
    sealing = store_sealing(redis)
    store = StateService(
        StateStoreSettings(
            amqp_url="amqp://unused/",
            redis_url=private_redis.url,
            kek_file=Path("/nonexistent/kek"),
            sealing_key_file=Path("/nonexistent/sealing"),  # keys handed over directly
            allow_volatile_redis=True,
            verify_host_identity=False,
        ),
        StateRepository(redis, KeyRing(kek), history_depth=10),
        store_bus,
        sealing,
    )
    await store_bus.consume(STATE_STORE_COMMANDS, store.command_routes(), prefetch=8)
    node = tmp_path / "node.xml"
    node.write_text("<node>\n</node>\n")
    for directory in ("swtpm", "nvram"):
        (tmp_path / directory).mkdir()
    settings = HostAgentSettings(
        host_id=HOST,
        libvirt_uri=f"test://{node}",
        swtpm_root=tmp_path / "swtpm",
        nvram_dir=tmp_path / "nvram",
        stability_window_s=0.2,
        heartbeat_interval_s=0.5,
        sealing_key_file=tmp_path / "host-sealing.key",
        store_sealing_key=sealing.own.public.to_text(),
    )
    agent = HostAgent(settings, broker.client(source=f"host-agent/{HOST}", origin=HOST))
    await register_host(sealing, HOST, agent.sealing.own.public)
    agent.hypervisor.open(agent.on_lifecycle, on_reconnect=agent.rebuild_view)
    await agent.bus.consume(host_command_queue(HOST), agent.routes(), prefetch=8)
    capabilities = HostCapabilities(
        swtpm_version="0.7.3",
        libvirt_version=await agent.hypervisor.library_version(),
        architectures=["x86_64", "i686"],
        uefi_firmware=True,
    )
    beating = asyncio.create_task(agent.heartbeat_forever(capabilities))
    scene = Scene(broker.client(source="automation/t", origin="automation"), agent, private_redis)
    try:
        await wait_until(
            lambda: _heard_from_host(scene), "the host's heartbeat to reach policy", TIMEOUT_S
        )
        yield scene
    finally:
        beating.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await beating
        await agent.lifecycle_tasks.cancel_all()
        agent.watcher.close()
        agent.hypervisor.close()
        await store.close()
        await policy.close()


async def _heard_from_host(scene: Scene) -> bool:
    return bool(await awaited(scene.redis_db.client.hexists(hosts_key(), HOST)))


def disks_and_interfaces(domain: ET.Element) -> list[tuple[str | None, ...]]:
    """What the manager decided about storage and network, as libvirt holds it."""
    disks = [
        (
            "disk",
            attribute(disk, "source", "file"),
            attribute(disk, "target", "dev"),
            attribute(disk, "driver", "type"),
        )
        for disk in domain.findall("devices/disk")
    ]
    interfaces = [
        (
            nic.get("type"),
            attribute(nic, "mac", "address"),
            attribute(nic, "source", "network") or attribute(nic, "source", "bridge"),
            attribute(nic, "model", "type"),
        )
        for nic in domain.findall("devices/interface")
    ]
    return [*disks, *interfaces]


def attribute(element: ET.Element, path: str, name: str) -> str | None:
    found = element.find(path)
    return None if found is None else found.get(name)


async def test_the_host_defines_exactly_the_managers_domain_and_the_next_start_again(
    scene: Scene,
) -> None:
    spec = await scene.enable()
    given = manager_xml(spec.vm_id, spec.name)

    done = await scene.ask(
        PlaceVm(vm_id=spec.vm_id, host=HOST, domain_xml=given), PlaceVmReply, spec.vm_id
    )

    assert done.ok, done.error
    epoch = done.epoch
    assert epoch is not None
    domain = await scene.defined(spec.vm_id)
    assert domain is not None
    manager = ET.fromstring(given)  # noqa: S314 - the test's own literal
    assert disks_and_interfaces(domain) == disks_and_interfaces(manager)
    assert len(domain.findall("devices/disk")) == 2
    assert domain.findtext("vcpu") == "4"
    assert domain.findtext("name") == spec.name
    assert domain.find(f"metadata/{{{NOVA}}}instance/{{{NOVA}}}name") is not None
    assert domain.find(f"metadata/{{{OSINFO}}}libosinfo") is not None
    placement = domain.find(f"metadata/{{{PLACEMENT_NAMESPACE}}}placement")
    assert placement is not None
    assert placement.get("epoch") == str(epoch)
    (tpm,) = domain.findall("devices/tpm")
    backend = tpm.find("backend")
    assert backend is not None
    assert (tpm.get("model"), backend.get("type"), backend.get("version")) == (
        "tpm-crb",
        "emulator",
        "2.0",
    )
    nvram = domain.findtext("os/nvram")
    assert nvram == str(scene.agent.settings.nvram_dir / f"{spec.name}_VARS.fd")
    assert await scene.kept_definition(spec.vm_id) is not None

    repeated = await scene.ask(
        PlaceVm(vm_id=spec.vm_id, host=HOST, domain_xml=given), PlaceVmReply, spec.vm_id
    )
    assert repeated.ok, repeated.error  # a redelivery: already placed
    assert repeated.epoch == epoch
    two_vcpus = given.replace("<vcpu>4</vcpu>", "<vcpu>2</vcpu>")
    changed = await scene.ask(
        PlaceVm(vm_id=spec.vm_id, host=HOST, domain_xml=two_vcpus), PlaceVmReply, spec.vm_id
    )
    assert not changed.ok
    assert "under another definition; stop it" in (changed.error or "")

    stopped = await scene.ask(
        StopVm(vm_id=spec.vm_id, mode=StopMode.POWEROFF), StopVmReply, spec.vm_id
    )
    assert stopped.ok, stopped.error
    assert await scene.defined(spec.vm_id) is None
    again = await scene.ask(PlaceVm(vm_id=spec.vm_id, host=HOST), PlaceVmReply, spec.vm_id)

    assert again.ok, again.error
    assert (again.epoch or 0) > epoch
    redefined = await scene.defined(spec.vm_id)
    assert redefined is not None
    assert disks_and_interfaces(redefined) == disks_and_interfaces(manager)
    assert redefined.findtext("vcpu") == "4"


async def test_a_conflicting_definition_is_refused_with_every_reason_and_changes_nothing(
    scene: Scene,
) -> None:
    spec = await scene.enable()
    conflicting = manager_xml(
        spec.vm_id,
        spec.name,
        tpm="<tpm model='tpm-tis'><backend type='emulator' version='1.2'/></tpm>",
    ).replace("<name>", "<name>other-", 1)

    refused = await scene.ask(
        PlaceVm(vm_id=spec.vm_id, host=HOST, domain_xml=conflicting), PlaceVmReply, spec.vm_id
    )

    assert not refused.ok
    assert refused.error is not None
    assert "identity: the domain is named 'other-" in refused.error
    assert "tpm: the domain's TPM is 'tpm-tis', the approved one tpm-crb" in refused.error
    assert "tpm-version: the domain's TPM is '1.2', the approved one 2.0" in refused.error
    assert await scene.placement(spec.vm_id) == ("", 0)  # no epoch raised, placed nowhere
    assert await scene.defined(spec.vm_id) is None
    assert await scene.kept_definition(spec.vm_id) is None

    # Started once with its manager's domain and stopped: a conflicting one changes nothing.
    given = manager_xml(spec.vm_id, spec.name)
    assert (
        await scene.ask(
            PlaceVm(vm_id=spec.vm_id, host=HOST, domain_xml=given), PlaceVmReply, spec.vm_id
        )
    ).ok
    assert (
        await scene.ask(StopVm(vm_id=spec.vm_id, mode=StopMode.POWEROFF), StopVmReply, spec.vm_id)
    ).ok
    kept, before = await scene.kept_definition(spec.vm_id), await scene.placement(spec.vm_id)

    refused = await scene.ask(
        PlaceVm(vm_id=spec.vm_id, host=HOST, domain_xml=conflicting), PlaceVmReply, spec.vm_id
    )

    assert not refused.ok
    assert await scene.placement(spec.vm_id) == before
    assert await scene.kept_definition(spec.vm_id) == kept
    assert await scene.defined(spec.vm_id) is None
