"""Undoing a placement whose start never reached its host, against a real Redis: the VM
runs nowhere again, a loss recorded on that host while the start waited is taken back (the
mark the VM had before is put back), a loss declared after the undo records nothing, and
the epoch raised by the fence stays raised."""

from __future__ import annotations

import time
import uuid

import pytest

from keeper_policy.storage.scripts import PolicyScripts
from keeper_policy.storage.vm_registry import LostMark, PolicyRegistry
from keeper_shared.messages.tpm import VmSpec
from support.redis_db import PrivateDatabase

pytestmark = [pytest.mark.redis]

TPM_XML = "<tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm>"


async def registered(private_redis: PrivateDatabase) -> tuple[PolicyRegistry, str]:
    registry = PolicyRegistry(private_redis.client, PolicyScripts(private_redis.client))
    spec = VmSpec(vm_id=str(uuid.uuid4()), name="win-01", guest_os="windows-11")
    await registry.register_vm(spec, TPM_XML)
    return registry, spec.vm_id


async def declare_lost(registry: PolicyRegistry, vm_id: str, host: str) -> bool:
    """What the loss handler does for each VM it finds on a lost host."""
    vm = await registry.vm(vm_id)
    return await registry.mark_lost(vm_id, host, vm.recovery_point(time.time()))


async def test_a_loss_declared_while_the_start_waited_is_taken_back(
    private_redis: PrivateDatabase,
) -> None:
    registry, vm_id = await registered(private_redis)
    before = await registry.lost_mark(vm_id)
    assert before == LostMark(None, None)
    epoch = await registry.place(vm_id, "host-b", expected_host=None)
    assert await declare_lost(registry, vm_id, "host-b")
    assert (await registry.vm(vm_id)).lost_from == "host-b"

    assert await registry.undo_place(vm_id, "host-b", before)

    vm = await registry.vm(vm_id)
    assert vm.lost_from is None
    assert await registry.lost_mark(vm_id) == LostMark(None, None)
    assert (vm.host, vm.epoch) == (None, epoch)  # unplaced; the fence is not undone
    assert await registry.vms_on("host-b") == []


async def test_a_loss_declared_after_the_undo_records_nothing(
    private_redis: PrivateDatabase,
) -> None:
    registry, vm_id = await registered(private_redis)
    before = await registry.lost_mark(vm_id)
    await registry.place(vm_id, "host-b", expected_host=None)
    assert await registry.undo_place(vm_id, "host-b", before)

    # The loss handler listed host-b's VMs before the undo and marks them after it.
    assert not await declare_lost(registry, vm_id, "host-b")
    assert (await registry.vm(vm_id)).lost_from is None


async def test_a_vm_taken_from_a_lost_host_keeps_that_loss_when_its_new_start_is_undone(
    private_redis: PrivateDatabase,
) -> None:
    registry, vm_id = await registered(private_redis)
    await registry.place(vm_id, "host-a", expected_host=None)
    assert await declare_lost(registry, vm_id, "host-a")
    before = await registry.lost_mark(vm_id)
    assert before.host == "host-a"
    assert before.recovery_point is not None

    epoch = await registry.place(vm_id, "host-b", expected_host="host-a")
    assert await declare_lost(registry, vm_id, "host-b")
    assert await registry.undo_place(vm_id, "host-b", before)

    vm = await registry.vm(vm_id)
    assert await registry.lost_mark(vm_id) == before  # host-a's loss was real
    assert (vm.host, vm.epoch) == (None, epoch)  # host-a stays fenced


async def test_a_loss_on_the_target_recorded_before_the_placement_stays(
    private_redis: PrivateDatabase,
) -> None:
    registry, vm_id = await registered(private_redis)
    await registry.place(vm_id, "host-b", expected_host=None)
    assert await declare_lost(registry, vm_id, "host-b")
    assert await registry.unplace(vm_id, "host-b")  # stopped while host-b was lost
    before = await registry.lost_mark(vm_id)

    await registry.place(vm_id, "host-b", expected_host=None)  # host-b is back
    assert await registry.undo_place(vm_id, "host-b", before)

    assert await registry.lost_mark(vm_id) == before
    assert (await registry.vm(vm_id)).lost_from == "host-b"
