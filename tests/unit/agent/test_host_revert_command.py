"""``vm.revert-domain`` on an in-memory hypervisor: the domain is defined and reverted under
the new placement epoch, the snapshot taken back from policy's XML when the domain lost it
(an undefine drops libvirt's snapshot metadata), and a running domain or an XML of another
placement is refused before anything changes. Also how a snapshot's XML is read for its
memory file."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from keeper_host_agent.commands.revert import RevertCommands
from keeper_host_agent.hypervisor.libvirt_memory_snapshots import memory_parts
from keeper_host_agent.settings import HostAgentSettings
from keeper_shared.bus.client import Delivery
from keeper_shared.domain_metadata import PLACEMENT_NAMESPACE
from keeper_shared.messages.envelope import new_envelope
from keeper_shared.messages.vm_control import RevertDomain
from support.fake_hypervisor import FakeDomain, FakeHypervisor
from support.sealing_keys import new_keys

DELIVERY = Delivery(user_id=None, redelivered=False, reply_to=None, correlation_id=None)
SNAPSHOT = "before-update"
MEMORY = "/var/lib/libvirt/qemu/memory-snapshots/x/before-update.mem"
SNAPSHOT_XML = (
    f"<domainsnapshot><name>{SNAPSHOT}</name>"
    f"<memory snapshot='external' file='{MEMORY}'/>"
    "<disks><disk name='vda' snapshot='no'/></disks></domainsnapshot>"
)


def domain_xml(vm_id: str, epoch: int) -> str:
    return (
        f"<domain type='qemu'><name>vm</name><uuid>{vm_id}</uuid><metadata>"
        f"<keeper:placement xmlns:keeper='{PLACEMENT_NAMESPACE}' epoch='{epoch}'/></metadata>"
        "<os><type arch='x86_64' machine='q35'>hvm</type>"
        "<loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE_4M.fd</loader>"
        "<nvram/></os><devices><tpm model='tpm-crb'><backend type='emulator' version='2.0'/>"
        "</tpm></devices></domain>"
    )


def commands(fake: FakeHypervisor, tmp_path: Path) -> RevertCommands:
    settings = HostAgentSettings(
        host_id="host-a",
        swtpm_root=tmp_path / "swtpm",
        nvram_dir=tmp_path / "nvram",
        sealing_key_file=tmp_path / "host-sealing.key",
        store_sealing_key=new_keys().public.to_text(),
    )
    return RevertCommands(settings, fake)


def revert(vm_id: str, *, xml_epoch: int, epoch: int) -> RevertDomain:
    return RevertDomain(
        vm_id=vm_id,
        epoch=epoch,
        domain_xml=domain_xml(vm_id, xml_epoch),
        snapshot_id=SNAPSHOT,
        snapshot_xml=SNAPSHOT_XML,
    )


async def test_an_undefined_domain_is_defined_given_its_snapshot_back_and_reverted(
    tmp_path: Path,
) -> None:
    vm_id = str(uuid.uuid4())
    fake = FakeHypervisor()

    done = await commands(fake, tmp_path).revert(
        new_envelope(revert(vm_id, xml_epoch=4, epoch=4), source="t", subject=vm_id), DELIVERY
    )

    assert done.ok, done.error
    assert [op for op, _ in fake.calls] == ["revert_to_snapshot", "redefine_snapshot"]
    reverted = fake.domains[vm_id]
    assert reverted.active
    assert reverted.snapshots == [SNAPSHOT]
    # The NVRAM path this host keeps is filled in, as for a start.
    assert f"{tmp_path / 'nvram'}/vm_VARS.fd" in reverted.xml
    assert reverted.metadata[PLACEMENT_NAMESPACE] == "<placement epoch='4'/>"


async def test_a_domain_that_still_has_its_snapshot_is_not_given_a_second(
    tmp_path: Path,
) -> None:
    vm_id = str(uuid.uuid4())
    fake = FakeHypervisor(FakeDomain(vm_id, "vm", active=False, snapshots=[SNAPSHOT]))

    done = await commands(fake, tmp_path).revert(
        new_envelope(revert(vm_id, xml_epoch=2, epoch=2), source="t", subject=vm_id), DELIVERY
    )

    assert done.ok, done.error
    assert ("redefine_snapshot", vm_id) not in fake.calls


@pytest.mark.parametrize(
    ("active", "xml_epoch", "error"),
    [
        (True, 3, "must be off"),
        (False, 2, "does not match the VM id and epoch"),
    ],
)
async def test_a_running_domain_or_another_placements_xml_is_refused(
    tmp_path: Path, active: bool, xml_epoch: int, error: str
) -> None:
    vm_id = str(uuid.uuid4())
    fake = FakeHypervisor(FakeDomain(vm_id, "vm", active=active))

    done = await commands(fake, tmp_path).revert(
        new_envelope(revert(vm_id, xml_epoch=xml_epoch, epoch=3), source="t", subject=vm_id),
        DELIVERY,
    )

    assert not done.ok
    assert done.error is not None
    assert error in done.error
    assert ("revert_to_snapshot", vm_id) not in fake.calls


def test_the_memory_file_and_disk_overlays_are_read_from_the_snapshot_xml() -> None:
    assert memory_parts(SNAPSHOT_XML) == (MEMORY, False)
    with_overlay = SNAPSHOT_XML.replace("snapshot='no'", "snapshot='external'")
    assert memory_parts(with_overlay)[1] is True
    without_memory = "<domainsnapshot><name>s</name><memory snapshot='no'/></domainsnapshot>"
    assert memory_parts(without_memory) == (None, False)
