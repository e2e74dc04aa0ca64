"""The host agent's ``vm.set-epoch`` against libvirt's real ``test:///`` driver: a running
domain takes a new placement epoch in its metadata (live and persistent), is re-read so its
state is announced under it, never goes back to an older epoch, and a repeat is a no-op."""

from __future__ import annotations

import uuid
from pathlib import Path

import libvirt
import pytest

from keeper_host_agent.commands.placement import PlacementCommands
from keeper_host_agent.hypervisor.domain_xml import fill_nvram_path, parse_domain
from keeper_policy.domain_definition import domain_xml
from keeper_shared.bus.client import Delivery
from keeper_shared.messages.envelope import new_envelope
from keeper_shared.messages.tpm import VmSpec
from keeper_shared.messages.vm_control import SetPlacementEpoch

pytestmark = pytest.mark.libvirt

TPM_XML = "<tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm>"
DELIVERY = Delivery(user_id=None, redelivered=False, reply_to=None, correlation_id=None)


def running_domain(tmp_path: Path, epoch: int) -> tuple[libvirt.virConnect, str]:
    (tmp_path / "node.xml").write_text("<node>\n</node>\n")
    connection = libvirt.open(f"test://{tmp_path / 'node.xml'}")
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
    return connection, vm_id


def epoch_of(connection: libvirt.virConnect, vm_id: str, flags: int = 0) -> int:
    domain = connection.lookupByUUIDString(vm_id)
    location = parse_domain(domain.XMLDesc(flags), swtpm_root=Path("/x"), nvram_dir=Path("/y"))
    assert location is not None
    return location.epoch


async def test_a_running_domain_takes_a_newer_epoch_only(tmp_path: Path) -> None:
    connection, vm_id = running_domain(tmp_path, epoch=1)
    refreshed: list[str] = []

    async def refresh(refreshed_vm: str) -> None:
        refreshed.append(refreshed_vm)

    commands = PlacementCommands(lambda: connection, refresh)

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
        connection.close()
