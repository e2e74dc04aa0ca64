"""State sent inline with its change: stored as it came, with no ``state.fetch``; one that
does not open with the store's keys is fetched instead; the fence refuses a stale one as it
refuses a fetched one. (Who may send it: test_host_identity.)

The events travel the real way: the fake host publishes them on the events exchange and the
store consumes them from its queue.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable

import pytest

from keeper_shared.messages.state import StatePersisted, StateWriteRefused
from keeper_shared.messages.types import FencingToken, StateKind
from keeper_shared.state_format.tpm_archive import MAIN_STATE_FILE_NAME, pack_tpm_state
from keeper_state_store.crypto.encryption import KeyEncryptionKey
from support.in_process_store import Store, running_store, sha256
from support.sealing_keys import new_keys
from support.waiting import wait_until

pytestmark = [pytest.mark.rabbit, pytest.mark.redis]

TIMEOUT_S = 30.0
VMS = 12


def _about(vm_id: str, kind: StateKind) -> Callable[[StatePersisted], bool]:
    return lambda event: (event.vm_id, event.kind) == (vm_id, kind)


def _tpm(label: str) -> bytes:
    return pack_tpm_state({MAIN_STATE_FILE_NAME: label.encode() * 300})


async def test_inline_changes_are_stored_without_a_fetch(store: Store) -> None:
    persisted = await store.client.watch_events(f"state.persisted.{store.origin}")
    vm_ids = [store.new_vm() for _ in range(VMS)]
    for index, vm_id in enumerate(vm_ids):
        await store.place(vm_id, epoch=1)
        store.host.hold(
            vm_id, StateKind.TPM, _tpm(f"vm {index}"), FencingToken(epoch=1, generation=1)
        )
        store.host.hold(vm_id, StateKind.NVRAM, b"\xff" * 8192, FencingToken(epoch=1, generation=2))
    store_key = store.service.sealing.own.public

    await store.host.announce_together(vm_ids, StateKind.TPM, inline_to=store_key)
    await store.host.announce_together(vm_ids, StateKind.NVRAM, inline_to=store_key)
    for vm_id in vm_ids:
        for kind in StateKind:
            await persisted.wait_for(StatePersisted, _about(vm_id, kind), TIMEOUT_S)

    for index, vm_id in enumerate(vm_ids):
        assert await store.repository.head_hash(vm_id, StateKind.TPM) == sha256(_tpm(f"vm {index}"))
        assert await store.repository.head_hash(vm_id, StateKind.NVRAM) == sha256(b"\xff" * 8192)
    assert store.host.fetches == [], "inline state costs no fetch"
    await store.wait_until_events_drained(TIMEOUT_S)


async def test_an_inline_blob_sealed_to_another_key_is_fetched_and_stored(store: Store) -> None:
    persisted = await store.client.watch_events(f"state.persisted.{store.origin}")
    vm_id = store.new_vm()
    await store.place(vm_id, epoch=1)
    content = _tpm("rotated")
    store.host.hold(vm_id, StateKind.TPM, content, FencingToken(epoch=1, generation=1))

    # Sealed to a key the store does not hold (a store key rotated past, or not yet learnt).
    await store.host.announce(vm_id, StateKind.TPM, inline_to=new_keys().public)

    await persisted.wait_for(StatePersisted, lambda e: e.vm_id == vm_id, TIMEOUT_S)
    assert await store.repository.head_hash(vm_id, StateKind.TPM) == sha256(content)
    assert store.host.fetches == [[vm_id]]
    await store.wait_until_events_drained(TIMEOUT_S)


async def test_an_inline_state_of_a_past_placement_is_refused_by_the_fence(store: Store) -> None:
    refused = await store.client.watch_events(f"state.refused.{store.origin}")
    persisted = await store.client.watch_events(f"state.persisted.{store.origin}")
    store_key = store.service.sealing.own.public
    vm_id = store.new_vm()
    await store.place(vm_id, epoch=1)
    first = store.host.hold(
        vm_id, StateKind.TPM, _tpm("first"), FencingToken(epoch=1, generation=1)
    )
    await store.host.announce(vm_id, StateKind.TPM, inline_to=store_key)
    await persisted.wait_for(StatePersisted, lambda e: e.vm_id == vm_id, TIMEOUT_S)

    # Policy starts the VM again (epoch 2); a late write of the old start still arrives,
    # newer than the stored head by its generation, but of a placement that is over.
    await store.place(vm_id, epoch=2)
    store.host.hold(vm_id, StateKind.TPM, _tpm("late"), FencingToken(epoch=1, generation=9))
    await store.host.announce(vm_id, StateKind.TPM, inline_to=store_key)

    audit = await refused.wait_for(StateWriteRefused, lambda e: e.vm_id == vm_id, TIMEOUT_S)
    assert "stale_epoch" in audit.data.reason
    assert await store.repository.head_hash(vm_id, StateKind.TPM) == first.content_hash
    assert store.host.fetches == []
    await store.wait_until_events_drained(TIMEOUT_S)


async def test_an_inline_state_older_than_the_stored_head_is_not_written(store: Store) -> None:
    persisted = await store.client.watch_events(f"state.persisted.{store.origin}")
    vm_id = store.new_vm()
    await store.place(vm_id, epoch=1)
    newer = store.host.hold(
        vm_id, StateKind.TPM, _tpm("newer"), FencingToken(epoch=1, generation=8)
    )
    await store.host.announce(vm_id, StateKind.TPM, inline_to=store.service.sealing.own.public)
    await persisted.wait_for(StatePersisted, lambda e: e.vm_id == vm_id, TIMEOUT_S)

    store.host.hold(vm_id, StateKind.TPM, _tpm("older"), FencingToken(epoch=1, generation=3))
    await store.host.announce(vm_id, StateKind.TPM, inline_to=store.service.sealing.own.public)
    await store.wait_until_events_drained(TIMEOUT_S)

    assert await store.repository.head_hash(vm_id, StateKind.TPM) == newer.content_hash
    assert await store.repository.head_version(vm_id, StateKind.TPM) == 1
    assert store.host.fetches == []


async def test_a_change_waiting_for_its_fetch_holds_up_no_other_event(
    rabbitmq_url: str, redis_url: str, kek: KeyEncryptionKey
) -> None:
    """Changes from events that arrive together are checked and written as one batch, but
    one to fetch leaves the batch for its own event: two events waiting on a host that does
    not answer (as many as batches go at once) leave inline changes behind them unhindered.
    Had they held their batches, the inline ones would wait for the fetches' timeout and
    each waiting event would be fetched a second time first."""
    async with running_store(rabbitmq_url, redis_url, kek, fetch_timeout_s=120.0) as store:
        persisted = await store.client.watch_events(f"state.persisted.{store.origin}")
        waiting = [store.new_vm() for _ in range(2)]
        inline = [store.new_vm() for _ in range(VMS)]
        for index, vm_id in enumerate([*waiting, *inline]):
            await store.place(vm_id, epoch=1)
            store.host.hold(
                vm_id, StateKind.TPM, _tpm(f"vm {index}"), FencingToken(epoch=1, generation=1)
            )
        store.host.answering.clear()
        for vm_id in waiting:
            await store.host.announce(vm_id, StateKind.TPM)  # by hash: to be fetched
            fetched = functools.partial(operator.contains, store.host.fetches, [vm_id])
            await wait_until(fetched, "the fetch", poll_s=0.02)

        await store.host.announce_together(
            inline, StateKind.TPM, inline_to=store.service.sealing.own.public
        )
        for vm_id in inline:
            await persisted.wait_for(StatePersisted, _about(vm_id, StateKind.TPM), TIMEOUT_S)

        assert store.host.fetches == [[vm_id] for vm_id in waiting], "each fetched once"
        for vm_id in waiting:
            assert await store.repository.head_hash(vm_id, StateKind.TPM) is None
        store.host.answering.set()
        for vm_id in waiting:
            await persisted.wait_for(StatePersisted, _about(vm_id, StateKind.TPM), TIMEOUT_S)
        await store.wait_until_events_drained(TIMEOUT_S)
