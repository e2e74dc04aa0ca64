"""The host agent's snapshot commands on an in-memory hypervisor: each does its thing once
and a repeat (a policy replica resuming a workflow) succeeds without doing it again; a
domain this host does not have is a refusal, not an exception."""

from __future__ import annotations

import uuid
from pathlib import Path

from keeper_host_agent.commands.snapshots import SnapshotCommands
from keeper_host_agent.hypervisor.port import Hypervisor
from keeper_shared.bus.client import Delivery
from keeper_shared.messages.envelope import Envelope, P, new_envelope
from keeper_shared.messages.replies import SnapshotDomainReply
from keeper_shared.messages.vm_control import (
    DeleteDomainSnapshot,
    ResumeVm,
    SnapshotDomain,
    SuspendVm,
)
from support.fake_hypervisor import FakeDomain, FakeHypervisor

DELIVERY = Delivery(user_id=None, redelivered=False, reply_to=None, correlation_id=None)
SNAPSHOT = "keeper-snap-1"


def envelope(payload: P) -> Envelope[P]:
    return new_envelope(payload, source="t", subject="vm")


def running_vm() -> tuple[str, FakeHypervisor]:
    vm_id = str(uuid.uuid4())
    return vm_id, FakeHypervisor(FakeDomain(vm_id, "vm", active=True))


async def test_a_running_domain_is_paused_snapshotted_and_resumed_once_each(
    tmp_path: Path,
) -> None:
    vm_id, fake = running_vm()
    hypervisor: Hypervisor = fake
    commands = SnapshotCommands(hypervisor, tmp_path)
    snapshot = SnapshotDomain(vm_id=vm_id, snapshot_id=SNAPSHOT, description="pinned v3")

    paused = await commands.suspend(envelope(SuspendVm(vm_id=vm_id)), DELIVERY)
    taken = await commands.snapshot(envelope(snapshot), DELIVERY)
    resumed = await commands.resume(envelope(ResumeVm(vm_id=vm_id)), DELIVERY)

    assert [paused.ok, taken.ok, resumed.ok] == [True, True, True]
    assert [done.changed for done in (paused, taken, resumed)] == [True] * 3
    # The memory goes to the snapshot directory, in a directory only root reads, and the
    # reply carries the snapshot's XML for policy to keep (naming that memory file).
    memory = tmp_path / vm_id / f"{SNAPSHOT}.mem"
    assert fake.memory_files[(vm_id, SNAPSHOT)] == memory
    assert memory.parent.stat().st_mode & 0o777 == 0o700
    assert taken.snapshot_xml is not None
    assert f"file='{memory}'" in taken.snapshot_xml
    domain = fake.domains[vm_id]
    assert domain.snapshots == [SNAPSHOT]
    assert not domain.paused
    assert domain.active


async def test_each_repeat_succeeds_without_doing_anything(tmp_path: Path) -> None:
    vm_id, fake = running_vm()
    commands = SnapshotCommands(fake, tmp_path)
    snapshot = SnapshotDomain(vm_id=vm_id, snapshot_id=SNAPSHOT)
    delete = DeleteDomainSnapshot(vm_id=vm_id, snapshot_id=SNAPSHOT)

    await commands.suspend(envelope(SuspendVm(vm_id=vm_id)), DELIVERY)
    await commands.snapshot(envelope(snapshot), DELIVERY)
    repeats = [
        await commands.suspend(envelope(SuspendVm(vm_id=vm_id)), DELIVERY),
        await commands.snapshot(envelope(snapshot), DELIVERY),
    ]
    await commands.resume(envelope(ResumeVm(vm_id=vm_id)), DELIVERY)
    await commands.delete_snapshot(envelope(delete), DELIVERY)
    repeats += [
        await commands.resume(envelope(ResumeVm(vm_id=vm_id)), DELIVERY),
        await commands.delete_snapshot(envelope(delete), DELIVERY),
    ]

    assert all(done.ok for done in repeats)
    assert [done.changed for done in repeats] == [False] * 4
    snapshot_again = repeats[1]
    assert isinstance(snapshot_again, SnapshotDomainReply)
    assert snapshot_again.snapshot_xml, "a repeated snapshot still reports its XML"
    acted = [operation for operation, _ in fake.calls]
    for operation in ("suspend", "create_snapshot", "resume", "delete_snapshot"):
        assert acted.count(operation) == 1, operation
    assert fake.domains[vm_id].snapshots == []


async def test_a_domain_this_host_does_not_have_is_refused(tmp_path: Path) -> None:
    commands = SnapshotCommands(FakeHypervisor(), tmp_path)
    missing = str(uuid.uuid4())

    done = await commands.snapshot(
        envelope(SnapshotDomain(vm_id=missing, snapshot_id=SNAPSHOT)), DELIVERY
    )

    assert not done.ok
    assert done.error is not None
    assert missing in done.error


async def test_a_deleted_snapshot_takes_its_memory_file_with_it(tmp_path: Path) -> None:
    vm_id, fake = running_vm()
    commands = SnapshotCommands(fake, tmp_path)
    await commands.snapshot(envelope(SnapshotDomain(vm_id=vm_id, snapshot_id=SNAPSHOT)), DELIVERY)
    await commands.snapshot(envelope(SnapshotDomain(vm_id=vm_id, snapshot_id="other")), DELIVERY)
    # The fake has no QEMU to write the memory; put it where QEMU would.
    for name in (SNAPSHOT, "other"):
        fake.memory_files[(vm_id, name)].write_bytes(b"guest memory")

    done = await commands.delete_snapshot(
        envelope(DeleteDomainSnapshot(vm_id=vm_id, snapshot_id=SNAPSHOT)), DELIVERY
    )

    assert (done.ok, done.changed) == (True, True)
    assert not fake.memory_files[(vm_id, SNAPSHOT)].exists()
    assert fake.memory_files[(vm_id, "other")].is_file(), "another snapshot's memory went too"
    assert fake.domains[vm_id].snapshots == ["other"]


async def test_the_memory_file_is_deleted_after_the_domain_was_undefined(tmp_path: Path) -> None:
    vm_id = str(uuid.uuid4())
    commands = SnapshotCommands(FakeHypervisor(), tmp_path)
    memory = tmp_path / vm_id / f"{SNAPSHOT}.mem"
    memory.parent.mkdir()
    memory.write_bytes(b"guest memory")
    delete = DeleteDomainSnapshot(vm_id=vm_id, snapshot_id=SNAPSHOT)

    first = await commands.delete_snapshot(envelope(delete), DELIVERY)
    second = await commands.delete_snapshot(envelope(delete), DELIVERY)

    assert (first.ok, first.changed) == (True, True)
    assert (second.ok, second.changed) == (True, False)
    assert not memory.parent.exists(), "the VM's emptied memory directory is left behind"
