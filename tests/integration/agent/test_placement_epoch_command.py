"""The host agent's ``vm.set-epoch`` against libvirt's real ``test:///`` driver: a running
domain takes a new placement epoch in its metadata (live and persistent), is re-read so its
state is announced under it, never goes back to an older epoch, and a repeat is a no-op.

The handler works through the agent's ``LibvirtHypervisor``; the test looks at the domain
through a second connection of its own, as an operator's ``virsh`` would. Both reach the
same simulated host because ``test:///default`` is shared by every connection of a process
(a ``test://<file>`` node is private to its connection).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest

from keeper_host_agent.commands.placement import PlacementCommands
from keeper_host_agent.hypervisor.domain_xml import fill_nvram_path, parse_domain
from keeper_host_agent.hypervisor.libvirt_adapter import LibvirtHypervisor
from keeper_policy.placement.domain_definition import domain_xml
from keeper_shared.bus.client import Delivery
from keeper_shared.messages.envelope import new_envelope
from keeper_shared.messages.tpm import VmSpec
from keeper_shared.messages.vm_control import SetPlacementEpoch

pytestmark = pytest.mark.libvirt

TPM_XML = "<tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm>"
DELIVERY = Delivery(user_id=None, redelivered=False, reply_to=None, correlation_id=None)
SHARED_TEST_NODE = "test:///default"


@pytest.fixture
def connection() -> Iterator[libvirt.virConnect]:
    """The test's own connection to the shared simulated host."""
    opened = libvirt.open(SHARED_TEST_NODE)
    try:
        yield opened
    finally:
        opened.close()


def running_domain(connection: libvirt.virConnect, tmp_path: Path, epoch: int) -> str:
    vm_id = str(uuid.uuid4())
    spec = VmSpec(vm_id=vm_id, name="migrated", guest_os="windows-11")
    xml = domain_xml(
        spec,
        tpm_xml=TPM_XML,
        epoch=epoch,
        ovmf_code=Path("/usr/share/OVMF/OVMF_CODE_4M.fd"),
        ovmf_vars_template=Path("/usr/share/OVMF/OVMF_VARS_4M.fd"),
    )
    connection.defineXML(fill_nvram_path(xml, tmp_path)).create()
    return vm_id


def epoch_of(connection: libvirt.virConnect, vm_id: str, flags: int = 0) -> int:
    domain = connection.lookupByUUIDString(vm_id)
    location = parse_domain(domain.XMLDesc(flags), swtpm_root=Path("/x"), nvram_dir=Path("/y"))
    assert location is not None
    return location.epoch


async def test_a_running_domain_takes_a_newer_epoch_only(
    connection: libvirt.virConnect, tmp_path: Path
) -> None:
    vm_id = running_domain(connection, tmp_path, epoch=1)
    refreshed: list[str] = []

    async def refresh(refreshed_vm: str) -> None:
        refreshed.append(refreshed_vm)

    hypervisor = LibvirtHypervisor(SHARED_TEST_NODE)
    hypervisor.open(lambda _event: None)
    commands = PlacementCommands(hypervisor, refresh)

    async def set_epoch(epoch: int) -> tuple[bool, str | None]:
        envelope = new_envelope(
            SetPlacementEpoch(vm_id=vm_id, epoch=epoch), source="t", subject=vm_id
        )
        done = await commands.set_epoch(envelope, DELIVERY)
        return done.ok, done.error

    try:
        assert await set_epoch(2) == (True, None)
        assert epoch_of(connection, vm_id) == 2
        assert epoch_of(connection, vm_id, libvirt.VIR_DOMAIN_XML_INACTIVE) == 2
        assert refreshed == [vm_id]  # re-read: the tracker announces under epoch 2

        assert await set_epoch(2) == (True, None)  # a repeat (redelivery) changes nothing
        assert refreshed == [vm_id]

        ok, error = await set_epoch(1)  # never back
        assert not ok
        assert error == "domain runs under epoch 2, newer than 1"
        assert epoch_of(connection, vm_id) == 2

        missing = new_envelope(
            SetPlacementEpoch(vm_id=str(uuid.uuid4()), epoch=5), source="t", subject="x"
        )
        done = await commands.set_epoch(missing, DELIVERY)
        assert not done.ok  # no such domain: a clear refusal, nothing raised
    finally:
        hypervisor.close()
        domain = connection.lookupByUUIDString(vm_id)
        domain.destroy()
        domain.undefine()
