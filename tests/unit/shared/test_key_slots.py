"""Every key of one VM is in one Redis Cluster slot, so one Lua script, MULTI/EXEC or
WATCH may touch them all on a cluster (the store's fenced write takes the placement and
seven state keys at once).

The builders are found by inspection (``support.vm_keys``), so a key added later is
checked too. The slot is
computed with redis-py's CRC16 (what ``CLUSTER KEYSLOT`` answers; the cluster integration
test asks the server the same for every key)."""

from __future__ import annotations

import uuid

import pytest
from redis.crc import key_slot

from keeper_shared.redis_access import keys as shared_keys
from support.vm_keys import per_vm_builders, public_builders, vm_keys


def test_the_builders_are_found() -> None:
    names = {name.rsplit(".", 1)[1] for name, _ in per_vm_builders()}
    assert {"placement_key", "state_head_key", "kind_state_keys", "workflow_key"} <= names


@pytest.mark.parametrize("vm_id", [str(uuid.UUID(int=n * 7919)) for n in range(1, 6)])
def test_every_key_of_a_vm_is_in_the_slot_of_its_hash_tag(vm_id: str) -> None:
    slots = {label: key_slot(key.encode()) for label, key in vm_keys(vm_id).items()}
    assert set(slots.values()) == {key_slot(vm_id.encode())}, slots


def test_different_vms_spread_over_the_slots() -> None:
    """The tag is the VM id alone (no shared prefix inside the braces)."""
    slots = {key_slot(shared_keys.placement_key(str(uuid.uuid4())).encode()) for _ in range(64)}
    assert len(slots) > 32


def test_a_shard_barrier_is_in_the_slot_of_its_tag() -> None:
    key = shared_keys.shard_barrier_key("barrier-7")
    assert key_slot(key.encode()) == key_slot(b"barrier-7")


def test_global_keys_are_only_the_known_ones() -> None:
    """Keys not tied to one VM: each is used alone in a command or script (never in one
    script or transaction with a VM's keys), so where its slot falls does not matter. A
    new one must be added here after checking that."""
    per_vm = {name for name, _ in per_vm_builders()}
    globals_ = {name.rsplit(".", 1)[1] for name, _ in public_builders() if name not in per_vm}
    assert globals_ == {
        "hosts_key",
        "host_sealing_keys_key",
        "replication_barrier_key",
        "shard_barrier_key",
        "host_vms_key",
        "host_cleanup_key",
        "vm_name_key",
    }
