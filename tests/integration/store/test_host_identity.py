"""A host speaks only for itself (invariant 3): the store trusts the broker-validated AMQP
``user_id`` of state events and fetch replies, not what the message body claims."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from keeper_shared.bus.client import Route
from keeper_shared.bus.topology import host_command_queue
from keeper_shared.messages.state import (
    FetchState,
    SealedVmState,
    StateChange,
    StateChanged,
    StateFetched,
    StatePersisted,
    StateWriteRefused,
)
from keeper_shared.messages.types import FencingToken, StateKind
from keeper_shared.sealing.state_blobs import seal_state_blob
from keeper_state_store.crypto.encryption import KeyEncryptionKey
from support.broker import Broker
from support.bus_clients import CLOSE_GRACE_S, BusClients, ConnectBus
from support.in_process_store import Store, running_store, sha256, unique

pytestmark = [pytest.mark.rabbit, pytest.mark.redis, pytest.mark.asyncio(loop_scope="module")]

TIMEOUT_S = 30.0
NVRAM = b"\xff" * 4096 + secrets.token_bytes(64)
UNANSWERED_FETCH_TIMEOUT_S = 5.0
"""The store's wait for a fetch reply where the only reply is forged: the forger answers at
once (in this process), so this bounds only how long the test waits for the store to give
up, not a race."""


@contextlib.asynccontextmanager
async def store_verifying_its_host(
    broker: Broker, redis_url: str, kek: KeyEncryptionKey, *, fetch_timeout_s: float = 10.0
) -> AsyncIterator[Store]:
    """A store whose host connects as its own broker user, so the store verifies it."""
    host_id = unique("h")
    password = secrets.token_hex(12)
    broker.add_user(host_id, password)
    async with running_store(
        broker.url,
        redis_url,
        kek,
        host_id=host_id,
        host_amqp_url=broker.url_for(host_id, password),
        fetch_timeout_s=fetch_timeout_s,
    ) as running:
        yield running


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def store(rabbitmq_broker: Broker, redis_url: str) -> AsyncIterator[Store]:
    """One store for the tests that leave its host connected: each works on VMs of its own
    and looks only at what happened to them (or since it began)."""
    kek = KeyEncryptionKey(os.urandom(32))
    async with store_verifying_its_host(rabbitmq_broker, redis_url, kek) as running:
        yield running


@pytest_asyncio.fixture(loop_scope="module")
async def connect_bus(rabbitmq_url: str) -> AsyncIterator[ConnectBus]:
    """The session's ``connect_bus``, in this module's event loop (the shared store's)."""
    clients = BusClients(rabbitmq_url)
    try:
        yield clients.connect
    finally:
        await clients.close_all()


async def test_the_host_itself_is_heard(store: Store) -> None:
    persisted = await store.client.watch_events(f"state.persisted.{store.origin}")
    vm_id = store.new_vm()
    await store.place(vm_id, epoch=1)
    store.host.hold(vm_id, StateKind.NVRAM, NVRAM, FencingToken(epoch=1, generation=1))

    await store.host.announce(vm_id, StateKind.NVRAM)

    await persisted.wait_for(StatePersisted, lambda e: e.vm_id == vm_id, TIMEOUT_S)
    assert await store.repository.head_hash(vm_id, StateKind.NVRAM) == sha256(NVRAM)


async def test_a_change_published_by_another_user_is_refused_and_audited(
    store: Store, connect_bus: ConnectBus
) -> None:
    fetches_before = len(store.host.fetches)
    refused = await store.client.watch_events(f"state.refused.{store.origin}")
    vm_id = store.new_vm()
    await store.place(vm_id, epoch=1)
    blob = store.host.hold(vm_id, StateKind.NVRAM, NVRAM, FencingToken(epoch=1, generation=1))
    impostor = await connect_bus(source="impostor", origin=store.host.host_id)
    # Same routing key and body a real announcement has; only the broker user differs.
    await impostor.publish_event(
        StateChanged(
            host=store.host.host_id,
            changes=[
                StateChange(
                    vm_id=vm_id,
                    kind=StateKind.NVRAM,
                    content_hash=blob.content_hash,
                    size=blob.size,
                    token=blob.token,
                )
            ],
        ),
        subject=vm_id,
    )
    audit = await refused.wait_for(StateWriteRefused, lambda e: e.vm_id == vm_id, TIMEOUT_S)
    assert "not by the host" in audit.data.reason
    assert store.host.fetches[fetches_before:] == []
    assert await store.repository.head_hash(vm_id, StateKind.NVRAM) is None


async def test_an_inline_change_published_by_another_user_is_refused_and_audited(
    store: Store, connect_bus: ConnectBus
) -> None:
    """State pushed inline is no way around invariant 3: sealed to the store's public key
    (which anyone may know) it still comes from the wrong broker user."""
    refused = await store.client.watch_events(f"state.refused.{store.origin}")
    vm_id = store.new_vm()
    await store.place(vm_id, epoch=1)
    store.host.hold(vm_id, StateKind.NVRAM, NVRAM, FencingToken(epoch=1, generation=1))
    forged = store.host.change(vm_id, StateKind.NVRAM, inline_to=store.service.sealing.own.public)
    impostor = await connect_bus(source="impostor", origin=store.host.host_id)
    fetches_before = len(store.host.fetches)

    await impostor.publish_event(
        StateChanged(host=store.host.host_id, changes=[forged]), subject=vm_id
    )

    audit = await refused.wait_for(StateWriteRefused, lambda e: e.vm_id == vm_id, TIMEOUT_S)
    assert "not by the host" in audit.data.reason
    assert store.host.fetches[fetches_before:] == []
    assert await store.repository.head_hash(vm_id, StateKind.NVRAM) is None


async def test_a_fetch_reply_from_another_user_is_ignored(
    rabbitmq_broker: Broker, redis_url: str, kek: KeyEncryptionKey, connect_bus: ConnectBus
) -> None:
    """An impostor answering on the host's command queue cannot feed the store state. (A
    store of the test's own: its host's connection is closed.)"""
    async with store_verifying_its_host(
        rabbitmq_broker, redis_url, kek, fetch_timeout_s=UNANSWERED_FETCH_TIMEOUT_S
    ) as store:
        vm_id = store.new_vm()
        await store.place(vm_id, epoch=1)
        await store.host.bus.close(5.0)  # the real host is gone; the impostor takes its queue
        forged = store.host.hold(vm_id, StateKind.NVRAM, NVRAM, FencingToken(epoch=1, generation=9))
        impostor = await connect_bus(source="impostor", origin=unique("x"))
        answered: list[str] = []

        async def answer(envelope: object, delivery: object) -> StateFetched:
            answered.append(vm_id)
            # Sealed to the store's public key, which anyone may know: sealing is no identity.
            sealed = seal_state_blob(vm_id, forged, store.service.sealing.own.public)
            return StateFetched(vms=[SealedVmState(vm_id=vm_id, blobs=[sealed])])

        try:
            await impostor.consume(
                host_command_queue(store.host.host_id), [Route(FetchState, answer)], prefetch=1
            )
            results = await store.service.pull_and_persist(
                store.host.host_id, [vm_id], [StateKind.NVRAM]
            )
        except TimeoutError:
            results = {vm_id: TimeoutError()}
        finally:
            await impostor.close(CLOSE_GRACE_S)  # before the store deletes the queue it consumes
        assert answered == [vm_id]
        assert results != {vm_id: None}
        assert await store.repository.head_hash(vm_id, StateKind.NVRAM) is None


async def test_a_host_writing_for_a_vm_it_does_not_hold_is_refused(store: Store) -> None:
    """The broker vouches for who the host is; the placement decides what it may write."""
    fetches_before = len(store.host.fetches)
    refused = await store.client.watch_events(f"state.refused.{store.origin}")
    vm_id = store.new_vm()
    await store.place(vm_id, epoch=1, host=unique("elsewhere"))
    store.host.hold(vm_id, StateKind.NVRAM, NVRAM, FencingToken(epoch=1, generation=1))

    await store.host.announce(vm_id, StateKind.NVRAM)  # with its own, validated user

    audit = await refused.wait_for(StateWriteRefused, lambda e: e.vm_id == vm_id, TIMEOUT_S)
    assert "not the VM's placement" in audit.data.reason
    assert store.host.fetches[fetches_before:] == []
    assert await store.repository.head_hash(vm_id, StateKind.NVRAM) is None
