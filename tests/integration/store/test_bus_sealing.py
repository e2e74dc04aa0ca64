"""The store's side of sealing on the bus, against a real Redis: which host keys it learns
(only from the host's own broker user), seals to (the newest announced) and drops (when
policy declares the host lost), and fetch replies it will not open."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import cast

import pytest_asyncio
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from keeper_shared.bus.topology import POLICY, STATE_STORE
from keeper_shared.messages.host import HostCapabilities, HostHeartbeat
from keeper_shared.messages.host_loss import HostLost
from keeper_shared.messages.host_requests import NewestState, ReadNewestState
from keeper_shared.messages.replies import RestoreStateReply, RetrieveStateReply
from keeper_shared.messages.state import RestoreState, RetrieveState
from keeper_shared.messages.types import FencingToken, StateKind
from keeper_shared.redis_access.keys import host_sealing_keys_key
from keeper_shared.redis_access.results import awaited
from keeper_shared.sealing.keys import SealingPrivateKeys, SealingPublicKey
from keeper_state_store.crypto.encryption import KeyEncryptionKey
from support.memory_store import STORE_HOST, MemoryStore, memory_store
from support.sealing_keys import new_keys

TIMEOUT_S = 10.0
CAPABILITIES = HostCapabilities(
    swtpm_version="0.8.0", libvirt_version="10.0.0", architectures=["x86_64"], uefi_firmware=True
)


@pytest_asyncio.fixture
async def store(redis_url: str, kek: KeyEncryptionKey) -> AsyncIterator[MemoryStore]:
    async with memory_store(redis_url, kek) as running:
        running.host.hold(
            running.vm_id, StateKind.TPM, b"tpm state", FencingToken(epoch=1, generation=1)
        )
        yield running


async def _heartbeat(store: MemoryStore, key: SealingPublicKey, *, user: str = STORE_HOST) -> None:
    bus = store.broker.client(source=f"host-agent/{STORE_HOST}", origin=STORE_HOST, user_id=user)
    beat = HostHeartbeat(
        host=STORE_HOST,
        interval_s=5.0,
        capabilities=CAPABILITIES,
        vms=[],
        sealing_key=key.to_text(),
    )
    await bus.publish_event(beat, subject=STORE_HOST)
    await store.broker.settled()


async def _known_key(store: MemoryStore) -> str | None:
    value = await awaited(store.redis.hget(host_sealing_keys_key(), STORE_HOST))
    return None if value is None else bytes(cast(bytes, value)).decode()


async def _restore(store: MemoryStore, epoch: int) -> RestoreStateReply:
    caller = store.broker.client(source="policy/t", origin=POLICY)
    reply = await caller.call(
        STATE_STORE,
        RestoreState(vm_id=store.vm_id, name="sealed-vm", host=STORE_HOST, epoch=epoch),
        RestoreStateReply,
        subject=store.vm_id,
        timeout_s=TIMEOUT_S,
    )
    return reply.data


async def _stored(store: MemoryStore) -> None:
    caller = store.broker.client(source="policy/t", origin=POLICY)
    reply = await caller.call(
        STATE_STORE,
        RetrieveState(vm_id=store.vm_id, host=STORE_HOST),
        RetrieveStateReply,
        subject=store.vm_id,
        timeout_s=TIMEOUT_S,
    )
    assert reply.data.ok, reply.data.error


async def test_a_rotated_key_announced_by_the_host_is_sealed_to_from_then_on(
    store: MemoryStore,
) -> None:
    await _stored(store)
    old_key = store.host.keys.get(store.host.keys.public.key_id)
    assert old_key is not None
    rotated = SealingPrivateKeys(X25519PrivateKey.generate(), [old_key])
    store.host.keys = rotated  # the host keeps its previous key for what is in flight

    await _heartbeat(store, rotated.public)
    done = await _restore(store, epoch=1)

    assert done.ok, done.error
    (sealed,) = [p.tpm for p in store.host.sealed_prepares if p.tpm is not None]
    assert sealed.sealed.key_id == rotated.public.key_id
    assert store.host.last_prepared(store.vm_id).tpm is not None
    assert await _known_key(store) == rotated.public.to_text()


async def test_a_key_announced_by_another_hosts_user_is_not_learnt(store: MemoryStore) -> None:
    before = await _known_key(store)
    attacker = new_keys()

    await _heartbeat(store, attacker.public, user="host-b")
    await _stored(store)
    done = await _restore(store, epoch=1)

    assert await _known_key(store) == before
    assert done.ok, done.error
    (prepare,) = store.host.sealed_prepares
    assert prepare.tpm is not None
    assert prepare.tpm.sealed.key_id == store.host.keys.public.key_id != attacker.public.key_id


async def test_a_lost_hosts_key_is_dropped_and_nothing_is_sealed_to_it(store: MemoryStore) -> None:
    await _stored(store)
    policy = store.broker.client(source="policy/t", origin=POLICY)

    await policy.publish_event(
        HostLost(host=STORE_HOST, last_seen=datetime.now(UTC), silent_for_s=60.0, vms=[]),
        subject=STORE_HOST,
    )
    await store.broker.settled()
    done = await _restore(store, epoch=2)
    host = store.broker.client(source=f"host-agent/{STORE_HOST}", origin=STORE_HOST)
    newest = await host.call(
        STATE_STORE,
        ReadNewestState(vm_id=store.vm_id, host=STORE_HOST),
        NewestState,
        subject=store.vm_id,
        timeout_s=TIMEOUT_S,
        host_request=True,
    )

    assert await _known_key(store) is None
    assert not done.ok
    assert "no sealing key known for host" in (done.error or "")
    assert store.host.sealed_prepares == []
    assert newest.data.tpm is None
    assert "no sealing key known" in (newest.data.refused or "")

    # Back as itself: its next heartbeat announces its key again.
    await _heartbeat(store, store.host.keys.public)
    assert (await _restore(store, epoch=2)).ok


async def test_a_fetch_reply_sealed_to_another_key_is_not_stored(store: MemoryStore) -> None:
    store.host.store_key = new_keys().public  # a host pinned to the wrong store key

    caller = store.broker.client(source="policy/t", origin=POLICY)
    reply = await caller.call(
        STATE_STORE,
        RetrieveState(vm_id=store.vm_id, host=STORE_HOST),
        RetrieveStateReply,
        subject=store.vm_id,
        timeout_s=TIMEOUT_S,
    )

    assert not reply.data.ok
    assert "does not open" in (reply.data.error or "")
    assert await store.repository.head_version(store.vm_id, StateKind.TPM) is None


async def _ask_newest(store: MemoryStore, key: SealingPublicKey, *, user: str) -> NewestState:
    bus = store.broker.client(source=f"host-agent/{STORE_HOST}", origin=STORE_HOST, user_id=user)
    reply = await bus.call(
        STATE_STORE,
        ReadNewestState(vm_id=store.vm_id, host=STORE_HOST, sealing_key=key.to_text()),
        NewestState,
        subject=store.vm_id,
        timeout_s=TIMEOUT_S,
        host_request=True,
    )
    return reply.data


async def test_a_hosts_own_request_for_its_newest_state_names_the_key_to_seal_to(
    store: MemoryStore,
) -> None:
    """The QEMU hook may ask before the store handled the agent's first heartbeat: the key in
    the host's own request is learnt (and one in another user's request is not)."""
    await _stored(store)
    await awaited(store.redis.hdel(host_sealing_keys_key(), STORE_HOST))
    attacker = new_keys()

    forged = await _ask_newest(store, attacker.public, user="host-b")
    assert forged.tpm is None
    assert await _known_key(store) is None

    newest = await _ask_newest(store, store.host.keys.public, user=STORE_HOST)
    assert newest.refused is None
    assert newest.tpm is not None
    assert newest.tpm.sealed.key_id == store.host.keys.public.key_id
    assert await _known_key(store) == store.host.keys.public.to_text()


async def test_a_restore_waits_for_a_key_its_hosts_heartbeat_brings(
    redis_url: str, kek: KeyEncryptionKey
) -> None:
    """Policy may place a VM on a host whose first heartbeat this store has not handled."""
    async with memory_store(redis_url, kek, host_key_wait_s=60.0) as store:
        store.host.hold(store.vm_id, StateKind.TPM, b"tpm", FencingToken(epoch=1, generation=1))
        await _stored(store)
        await awaited(store.redis.hdel(host_sealing_keys_key(), STORE_HOST))

        restoring = asyncio.create_task(_restore(store, epoch=2))
        await asyncio.sleep(0.2)  # most likely waiting for the key by now (it passes either way)
        await _heartbeat(store, store.host.keys.public)
        done = await restoring

        assert done.ok, done.error
        assert store.host.last_prepared(store.vm_id).tpm is not None
