"""Pulls batched per host: many ``state.changed`` events for one host at once cost far fewer
``state.fetch`` calls than events, and every one of them is persisted and acknowledged.

The changes here are announced by their hashes alone, as an agent announces what it does
not send inline (a blob above its cap, a VM whose TPM has a foreign secret, or any change
while it is capped at release 0.1.0); inline state costs no fetch at all
(test_store_inline_state). The events travel the real way: the fake host publishes them on
the events exchange, the store consumes them from its queue (prefetch 32) and coalesces the
pulls.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
from redis.exceptions import ResponseError

from keeper_shared.messages.host import HostCapabilities, HostHeartbeat, VmInventoryEntry
from keeper_shared.messages.state import StatePersisted, StateWriteRefused
from keeper_shared.messages.types import FencingToken, StateKind
from keeper_shared.redis_access.keys import state_head_key
from keeper_shared.state_format.tpm_archive import MAIN_STATE_FILE_NAME, pack_tpm_state
from support.in_process_store import Store, sha256

pytestmark = [pytest.mark.rabbit, pytest.mark.redis]

VMS = 40
TIMEOUT_S = 30.0


async def test_many_changes_on_one_host_are_fetched_in_few_batches(store: Store) -> None:
    persisted = await store.client.watch_events(f"state.persisted.{store.origin}")
    vm_ids = [store.new_vm() for _ in range(VMS)]
    contents = {}
    for index, vm_id in enumerate(vm_ids):
        await store.place(vm_id, epoch=1)
        contents[vm_id] = pack_tpm_state({MAIN_STATE_FILE_NAME: f"vm {index}".encode() * 300})
        store.host.hold(vm_id, StateKind.TPM, contents[vm_id], FencingToken(epoch=1, generation=1))

    await asyncio.gather(*(store.host.announce(vm_id, StateKind.TPM) for vm_id in vm_ids))
    for vm_id in vm_ids:
        await persisted.wait_for(StatePersisted, _about(vm_id), TIMEOUT_S)

    for vm_id in vm_ids:
        assert await store.repository.head_hash(vm_id, StateKind.TPM) == sha256(contents[vm_id])
    fetched = [vm for batch in store.host.fetches for vm in batch]
    assert sorted(fetched) == sorted(vm_ids), "each VM fetched exactly once"
    # How the events split into batches depends on scheduling (a batch forms while the
    # host's earlier fetches are in flight, several at once): on a loaded machine 10 of 40
    # were seen. Unbatched, every event would cost its own fetch.
    assert len(store.host.fetches) < VMS / 2, store.host.fetches
    assert max(len(batch) for batch in store.host.fetches) > 1

    # Every event was acknowledged: nothing waits in the queue or is held unacked.
    await store.wait_until_events_drained(TIMEOUT_S)


async def test_redelivered_and_duplicate_changes_cost_no_fetch(store: Store) -> None:
    vm_id = store.new_vm()
    await store.place(vm_id, epoch=1)
    store.host.hold(
        vm_id,
        StateKind.TPM,
        pack_tpm_state({MAIN_STATE_FILE_NAME: b"stable" * 50}),
        FencingToken(epoch=1, generation=1),
    )
    await store.pull(vm_id)
    fetches_before = len(store.host.fetches)

    await asyncio.gather(*(store.host.announce(vm_id, StateKind.TPM) for _ in range(5)))
    await store.wait_until_events_drained(TIMEOUT_S)

    assert len(store.host.fetches) == fetches_before
    assert await store.repository.head_version(vm_id, StateKind.TPM) == 1


async def test_a_change_older_than_the_stored_head_costs_no_fetch(store: Store) -> None:
    """A backlog after an outage announces many states a newer stored one superseded: each
    is acknowledged without a fetch (a fetch would only store the host's current state)."""
    vm_id = store.new_vm()
    await store.place(vm_id, epoch=1)
    newer = store.host.hold(
        vm_id,
        StateKind.TPM,
        pack_tpm_state({MAIN_STATE_FILE_NAME: b"newer" * 50}),
        FencingToken(epoch=1, generation=2),
    )
    await store.pull(vm_id)
    fetches_before = len(store.host.fetches)
    store.host.hold(
        vm_id,
        StateKind.TPM,
        pack_tpm_state({MAIN_STATE_FILE_NAME: b"older" * 50}),
        FencingToken(epoch=1, generation=1),
    )

    await store.host.announce(vm_id, StateKind.TPM)
    await store.wait_until_events_drained(TIMEOUT_S)

    assert len(store.host.fetches) == fetches_before
    assert await store.repository.head_hash(vm_id, StateKind.TPM) == newer.content_hash


def _about(vm_id: str) -> Callable[[StatePersisted], bool]:
    return lambda event: event.vm_id == vm_id


async def test_a_heartbeat_reconciles_changes_whose_events_were_lost(store: Store) -> None:
    """A lost ``state.changed`` costs at most one heartbeat: the inventory's hash is pulled.
    A VM the host lists but is not placed on is left alone."""
    persisted = await store.client.watch_events(f"state.persisted.{store.origin}")
    missed, elsewhere = store.new_vm(), store.new_vm()
    await store.place(missed, epoch=1)
    await store.place(elsewhere, epoch=1, host="some-other-host")
    contents = {}
    for vm_id in (missed, elsewhere):
        contents[vm_id] = pack_tpm_state({MAIN_STATE_FILE_NAME: vm_id.encode() * 100})
        store.host.hold(vm_id, StateKind.TPM, contents[vm_id], FencingToken(epoch=1, generation=1))

    beat = HostHeartbeat(
        host=store.host.host_id,
        interval_s=1.0,
        capabilities=HostCapabilities(
            swtpm_version="0.7.1",
            libvirt_version="9.0.0",
            architectures=["x86_64"],
            uefi_firmware=True,
        ),
        vms=[
            VmInventoryEntry(
                vm_id=vm_id, epoch=1, tpm_hash=sha256(contents[vm_id]), nvram_hash=None
            )
            for vm_id in (missed, elsewhere)
        ],
    )
    await store.host.bus.publish_event(beat, subject=store.host.host_id)

    await persisted.wait_for(StatePersisted, _about(missed), TIMEOUT_S)
    await store.wait_until_events_drained(TIMEOUT_S)
    assert await store.repository.head_hash(missed, StateKind.TPM) == sha256(contents[missed])
    assert await store.repository.head_hash(elsewhere, StateKind.TPM) is None
    assert [vm for batch in store.host.fetches for vm in batch] == [missed]


async def test_one_event_announcing_several_vms_persists_each_and_refuses_the_misplaced(
    store: Store,
) -> None:
    events = await store.client.watch_events("state.#")
    placed = [store.new_vm() for _ in range(3)]
    elsewhere = store.new_vm()
    for vm_id in placed:
        await store.place(vm_id, epoch=1)
    await store.place(elsewhere, epoch=1, host="another-host")
    contents = {}
    for index, vm_id in enumerate([*placed, elsewhere]):
        contents[vm_id] = pack_tpm_state({MAIN_STATE_FILE_NAME: f"batch {index}".encode() * 99})
        store.host.hold(vm_id, StateKind.TPM, contents[vm_id], FencingToken(epoch=1, generation=1))

    await store.host.announce_together([*placed, elsewhere], StateKind.TPM)
    for vm_id in placed:
        await events.wait_for(StatePersisted, _about(vm_id), TIMEOUT_S)
    refused = await events.wait_for(
        StateWriteRefused, lambda event: event.vm_id == elsewhere, TIMEOUT_S
    )

    assert "placement" in refused.data.reason
    for vm_id in placed:
        assert await store.repository.head_hash(vm_id, StateKind.TPM) == sha256(contents[vm_id])
    assert await store.repository.head_hash(elsewhere, StateKind.TPM) is None
    assert store.host.fetches == [placed], "one fetch for the event, never the misplaced VM"
    await store.wait_until_events_drained(TIMEOUT_S)


async def test_a_vm_whose_write_redis_fails_does_not_fail_its_batch(store: Store) -> None:
    # A fetched batch is written in one Redis pipeline; a damaged key fails that VM's
    # write alone, and the others are stored and announced.
    events = await store.client.watch_events("state.#")
    healthy = [store.new_vm() for _ in range(2)]
    damaged = store.new_vm()
    contents = {}
    for index, vm_id in enumerate([*healthy, damaged]):
        await store.place(vm_id, epoch=1)
        contents[vm_id] = pack_tpm_state({MAIN_STATE_FILE_NAME: f"vm {index}".encode() * 99})
        store.host.hold(vm_id, StateKind.TPM, contents[vm_id], FencingToken(epoch=1, generation=1))
    await store.redis.set(state_head_key(damaged, StateKind.TPM), b"not a hash")

    results = await store.service.pull_and_persist(
        store.host.host_id, [healthy[0], damaged, healthy[1]], [StateKind.TPM]
    )

    assert isinstance(results[damaged], ResponseError)
    assert [results[vm_id] for vm_id in healthy] == [None, None]
    for vm_id in healthy:
        await events.wait_for(StatePersisted, _about(vm_id), TIMEOUT_S)
        assert await store.repository.head_hash(vm_id, StateKind.TPM) == sha256(contents[vm_id])
    assert await store.redis.get(state_head_key(damaged, StateKind.TPM)) == b"not a hash"
    assert store.host.fetches == [[healthy[0], damaged, healthy[1]]]
