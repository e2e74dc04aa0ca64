"""The state store's event and command handlers on the in-memory bus double, against a
real Redis: a host's ``state.changed`` is pulled, verified, stored and announced; a change
published by another host's user is refused; a retrieval before a destroy is done only when
the host's newest state is stored. The same paths run on the real broker in
test_host_identity and the chaos runs; here they run in well under a second each."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest_asyncio
from redis.asyncio import Redis

from keeper_shared.bus.client import Delivery, Route
from keeper_shared.bus.topology import (
    STATE_STORE,
    QueueSpec,
)
from keeper_shared.messages.envelope import Envelope
from keeper_shared.messages.host_requests import NewestState, ReadNewestState
from keeper_shared.messages.replies import RetrieveStateReply
from keeper_shared.messages.state import (
    RetrieveState,
    StatePersisted,
    StateWriteRefused,
)
from keeper_shared.messages.types import FencingToken, StateKind
from keeper_shared.redis_access.keys import placement_key
from keeper_shared.redis_access.results import awaited
from keeper_shared.sealing.state_blobs import open_state_blob
from keeper_shared.state_format.blobs import open_blob
from keeper_state_store.crypto.encryption import KeyEncryptionKey
from keeper_state_store.storage.repository import StateRepository
from support.in_process_store import FakeHost, sha256
from support.memory_bus import MemoryBroker
from support.memory_store import STORE_HOST, memory_store
from support.waiting import wait_until

HOST = STORE_HOST
TIMEOUT_S = 30.0
"""Generous: against hangs only."""


AUDIT = QueueSpec(name="test.audit", event_bindings=("state.persisted.*", "state.refused.*"))
"""What automation watching the store would bind: its announcements and its refusals."""


class PolicyView:
    """What the store announced."""

    def __init__(self) -> None:
        self.persisted: list[StatePersisted] = []
        self.refused: list[StateWriteRefused] = []

    async def on_persisted(self, envelope: Envelope[StatePersisted], _: Delivery) -> None:
        self.persisted.append(envelope.data)

    async def on_refused(self, envelope: Envelope[StateWriteRefused], _: Delivery) -> None:
        self.refused.append(envelope.data)


@dataclass
class Scene:
    broker: MemoryBroker
    host: FakeHost
    policy: PolicyView
    repository: StateRepository
    redis: Redis
    vm_id: str


@pytest_asyncio.fixture
async def scene(redis_url: str, kek: KeyEncryptionKey) -> AsyncIterator[Scene]:
    async with memory_store(redis_url, kek) as store:
        policy = PolicyView()
        observer = store.broker.client(source="policy/t", origin="policy")
        routes = [
            Route(StatePersisted, policy.on_persisted),
            Route(StateWriteRefused, policy.on_refused),
        ]
        await observer.consume(AUDIT, routes, prefetch=8)
        yield Scene(store.broker, store.host, policy, store.repository, store.redis, store.vm_id)


async def test_a_change_is_pulled_stored_and_announced(scene: Scene) -> None:
    content = b"tpm state " + uuid.uuid4().bytes
    scene.host.hold(scene.vm_id, StateKind.TPM, content, FencingToken(epoch=1, generation=1))

    await scene.host.announce(scene.vm_id, StateKind.TPM)
    await wait_until(lambda: bool(scene.policy.persisted), "state.persisted", timeout_s=TIMEOUT_S)

    (persisted,) = scene.policy.persisted
    assert (persisted.vm_id, persisted.version, persisted.host) == (scene.vm_id, 1, HOST)
    assert persisted.content_hash == sha256(content)
    assert await scene.repository.head_version(scene.vm_id, StateKind.TPM) == 1
    assert scene.host.fetches == [[scene.vm_id]]


async def test_a_change_published_by_another_hosts_user_is_refused(scene: Scene) -> None:
    scene.host.hold(scene.vm_id, StateKind.TPM, b"forged", FencingToken(epoch=1, generation=1))
    # The impostor claims to be HOST in the body; the broker validated its own user.
    impostor = scene.broker.client(source=f"host-agent/{HOST}", origin=HOST, user_id="host-b")
    scene.host.bus = impostor

    await scene.host.announce(scene.vm_id, StateKind.TPM)
    await scene.broker.settled()

    assert scene.policy.persisted == []
    (refused,) = scene.policy.refused
    assert refused.vm_id == scene.vm_id
    assert "not by the host" in refused.reason
    assert scene.host.fetches == []
    assert await scene.repository.head_version(scene.vm_id, StateKind.TPM) is None


async def ask_newest(scene: Scene, host: str, *, sender: str | None = None) -> NewestState:
    """What a host's QEMU hook gets when it asks the store for the VM's newest state."""
    bus = scene.broker.client(source=f"host-agent/{host}", origin=host, user_id=sender or host)
    reply = await bus.call(
        STATE_STORE,
        ReadNewestState(vm_id=scene.vm_id, host=host),
        NewestState,
        subject=scene.vm_id,
        timeout_s=TIMEOUT_S,
        host_request=True,
    )
    return reply.data


async def test_the_placement_host_gets_the_newest_verified_state_and_no_other_host_does(
    scene: Scene,
) -> None:
    content = b"tpm state " + uuid.uuid4().bytes
    scene.host.hold(scene.vm_id, StateKind.TPM, content, FencingToken(epoch=1, generation=1))
    await scene.host.announce(scene.vm_id, StateKind.TPM)
    await wait_until(lambda: bool(scene.policy.persisted), "state.persisted", timeout_s=TIMEOUT_S)

    newest = await ask_newest(scene, HOST)
    elsewhere = await ask_newest(scene, "host-b")
    forged = await ask_newest(scene, HOST, sender="host-b")

    assert newest.refused is None
    assert newest.tpm is not None
    assert open_blob(open_state_blob(scene.vm_id, newest.tpm, scene.host.keys)) == content
    assert newest.nvram is None
    assert newest.versions == {StateKind.TPM: 1}
    assert elsewhere.refused is not None
    assert "not on host-b" in elsewhere.refused
    assert elsewhere.tpm is None
    assert forged.refused is not None
    assert "not by host" in forged.refused
    assert forged.tpm is None


async def retrieve(scene: Scene) -> RetrieveStateReply:
    caller = scene.broker.client(source="policy/t", origin="policy")
    reply = await caller.call(
        STATE_STORE,
        RetrieveState(vm_id=scene.vm_id, host=HOST),
        RetrieveStateReply,
        subject=scene.vm_id,
        timeout_s=TIMEOUT_S,
    )
    return reply.data


async def test_a_retrieval_is_done_when_the_hosts_newest_state_is_stored(scene: Scene) -> None:
    scene.host.hold(scene.vm_id, StateKind.TPM, b"final", FencingToken(epoch=1, generation=1))

    done = await retrieve(scene)

    assert done.ok, done.error
    assert done.versions == {StateKind.TPM: 1}


async def test_a_vm_the_host_does_not_hold_is_not_retrieved(scene: Scene) -> None:
    done = await retrieve(scene)

    assert not done.ok
    assert done.error == f"host {HOST} does not hold the VM"


async def test_a_write_the_fence_refuses_is_not_a_retrieval(scene: Scene) -> None:
    """The VM was placed elsewhere meanwhile: what this host holds is refused, so its
    newest state is not stored, and the retrieval says so instead of succeeding."""
    scene.host.hold(scene.vm_id, StateKind.TPM, b"late", FencingToken(epoch=1, generation=1))
    await awaited(scene.redis.hset(placement_key(scene.vm_id), mapping={"host": "host-b"}))

    done = await retrieve(scene)

    assert not done.ok
    assert done.error is not None
    assert "newest tpm state was not stored" in done.error
    await wait_until(lambda: bool(scene.policy.refused), "state.refused", timeout_s=TIMEOUT_S)
