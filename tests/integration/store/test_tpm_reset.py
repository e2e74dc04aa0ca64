"""Invariant 10 at persist time, against real TPM states, a real Redis and the store's own
handlers on the in-memory bus double.

The states are manufactured by swtpm_setup and written through swtpm, as libvirt does: a
TPM before and after seals (one identity), another TPM (manufactured again, a new
endorsement key), and the same pair encrypted with a libvirt secret. First the store's
fingerprint is held against the real thing: two states have equal fingerprints exactly
when a throwaway swtpm reads equal EKs from them. Then the store persists what a host
announces: a TPM replaced unasked is stored but flagged at once (``state.tpm.reset``),
the VM's own stays the one handed out (``state.newest``, restores) and is never trimmed
away, until ``state.tpm.accept`` or until the VM's own TPM is persisted again.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio
from pydantic import SecretBytes
from redis.asyncio import Redis

from keeper_devtools.swtpm_lab import DEMO_NV_INDEX, manufacture_tpm_state, nv_write_secret
from keeper_shared.bus.client import BusClient, Delivery, Route
from keeper_shared.bus.topology import (
    STATE_STORE,
    QueueSpec,
)
from keeper_shared.libtpms import (
    NULL_PROFILE,
    NULL_PROFILE_LEVEL,
    installed_libtpms_version,
    release_of,
)
from keeper_shared.messages.envelope import Envelope, Payload
from keeper_shared.messages.host_requests import NewestState, ReadNewestState
from keeper_shared.messages.replies import AcceptTpmReply, RestoreStateReply
from keeper_shared.messages.state import RestoreState, StatePersisted
from keeper_shared.messages.tpm_reset import (
    AcceptTpm,
    ResetClearing,
    ResetFoundBy,
    TpmReset,
    TpmResetCleared,
)
from keeper_shared.messages.types import FencingToken, StateKind, TpmSecret
from keeper_shared.redis_access.keys import PREFIX
from keeper_shared.redis_access.results import awaited
from keeper_shared.sealing.state_blobs import open_state_blob
from keeper_shared.state_format.blobs import open_blob
from keeper_shared.state_format.tpm_archive import (
    MAIN_STATE_FILE_NAME,
    pack_tpm_state,
    read_tpm_state_dir,
    unpack_tpm_state,
)
from keeper_shared.swtpm import start_swtpm
from keeper_state_store.crypto.encryption import KeyEncryptionKey
from keeper_state_store.identity.fingerprint import archive_identity
from keeper_state_store.scrub.tpm_probe import probe_tpm_state
from keeper_state_store.storage.history_listing import read_kind_history
from support.in_process_store import FakeHost
from support.memory_store import STORE_HOST, memory_store
from support.waiting import wait_until

pytestmark = [
    pytest.mark.redis,
    pytest.mark.swtpm,
    pytest.mark.usefixtures("swtpm_tools", "no_swtpm_left"),
]

HOST = STORE_HOST
TIMEOUT_S = 30.0
"""Generous: against hangs only."""
SECRET = b"libvirt-secret-value-" + os.urandom(8).hex().encode()

WATCHED = QueueSpec(
    name="test.tpm-reset",
    event_bindings=("state.persisted.*", "state.tpm.reset.*", "state.tpm.reset.cleared.*"),
)


async def _one_tpm(
    root: Path, ca_config: Path, seals: int, passphrase: bytes | None
) -> list[bytes]:
    """A manufactured TPM's canonical archive, then after each of ``seals`` NV writes."""
    state_dir = root / "tpm2"
    await manufacture_tpm_state(state_dir, config=ca_config, passphrase=passphrase)
    archives = [pack_tpm_state(read_tpm_state_dir(state_dir))]
    for index in range(seals):
        async with await start_swtpm(state_dir, passphrase=passphrase) as tpm:
            await nv_write_secret(tpm.tcti, DEMO_NV_INDEX + index, os.urandom(32))
        archives.append(pack_tpm_state(read_tpm_state_dir(state_dir)))
    return archives


@dataclass(frozen=True)
class TpmStates:
    own: list[bytes]
    """One TPM: as manufactured, then after each of three seals."""
    other: list[bytes]
    """A TPM manufactured again (a new EK): as manufactured, then after one seal."""
    encrypted_own: list[bytes]
    encrypted_other: list[bytes]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def tpm_states(tmp_path_factory: pytest.TempPathFactory, ca_config: Path) -> TpmStates:
    mk = tmp_path_factory.mktemp
    return TpmStates(
        own=await _one_tpm(mk("own"), ca_config, 3, None),
        other=await _one_tpm(mk("other"), ca_config, 1, None),
        encrypted_own=await _one_tpm(mk("enc-own"), ca_config, 1, SECRET),
        encrypted_other=await _one_tpm(mk("enc-other"), ca_config, 0, SECRET),
    )


def _variant(archive: bytes) -> bytes:
    """The same TPM with another volatile state: another content hash, the same permall."""
    files = unpack_tpm_state(archive)
    return pack_tpm_state({**files, "tpm2-00.volatilestate": os.urandom(64)})


# --- the fingerprint against the real thing -------------------------------------------


async def test_fingerprints_are_equal_exactly_when_swtpm_reads_equal_endorsement_keys(
    tpm_states: TpmStates,
) -> None:
    plain = [*tpm_states.own, *tpm_states.other]
    fingerprints = [archive_identity(archive).fingerprint for archive in plain]
    assert all(fingerprints), "every real plain state has a readable identity"
    eks = [(await probe_tpm_state(unpack_tpm_state(archive))).ek_sha256 for archive in plain]
    assert all(eks), "swtpm_setup --createek made an EK in each"
    for i in range(len(plain)):
        for j in range(len(plain)):
            assert (fingerprints[i] == fingerprints[j]) == (eks[i] == eks[j]), (i, j)
    assert len(set(fingerprints)) == 2, "one identity per manufactured TPM, seals or not"

    encrypted = [*tpm_states.encrypted_own, *tpm_states.encrypted_other]
    with_secret = [archive_identity(archive, SECRET) for archive in encrypted]
    encrypted_eks = [
        (await probe_tpm_state(unpack_tpm_state(archive), passphrase=SECRET)).ek_sha256
        for archive in encrypted
    ]
    assert with_secret[0].fingerprint == with_secret[1].fingerprint != with_secret[2].fingerprint
    assert encrypted_eks[0] == encrypted_eks[1] != encrypted_eks[2]
    for archive in encrypted:
        # Never a guess: without the secret, or with a wrong one, the identity is unknown.
        assert archive_identity(archive).fingerprint is None
        assert archive_identity(archive, b"not-the-secret").fingerprint is None


# --- the store deciding as it persists ------------------------------------------------


class Watcher:
    """Every event the store announced, in order."""

    def __init__(self) -> None:
        self.events: list[Payload] = []

    async def on_event(self, envelope: Envelope[Payload], _: Delivery) -> None:
        self.events.append(envelope.data)

    def of(self, kind: type[Payload]) -> list[Payload]:
        return [event for event in self.events if isinstance(event, kind)]


@dataclass
class Scene:
    host: FakeHost
    watcher: Watcher
    client: BusClient
    redis: Redis
    vm_id: str
    generation: int = 0

    async def persist(self, content: bytes) -> int:
        """The host holds ``content`` as its next TPM state and announces it; the version
        the store persisted."""
        self.generation += 1
        token = FencingToken(epoch=1, generation=self.generation)
        blob = self.host.hold(self.vm_id, StateKind.TPM, content, token)
        before = len(self.watcher.of(StatePersisted))
        await self.host.announce(self.vm_id, StateKind.TPM)
        await wait_until(
            lambda: len(self.watcher.of(StatePersisted)) > before,
            "state.persisted",
            timeout_s=TIMEOUT_S,
        )
        persisted = self.watcher.of(StatePersisted)[-1]
        assert isinstance(persisted, StatePersisted)
        assert persisted.content_hash == blob.content_hash
        return persisted.version

    async def newest_tpm(self) -> tuple[int, bytes]:
        """What the QEMU hook's ``state.newest`` hands out for the TPM."""
        reply = await self.host.bus.call(
            STATE_STORE,
            ReadNewestState(vm_id=self.vm_id, host=HOST),
            NewestState,
            subject=self.vm_id,
            timeout_s=TIMEOUT_S,
            host_request=True,
        )
        assert reply.data.refused is None
        assert reply.data.tpm is not None
        opened = open_state_blob(self.vm_id, reply.data.tpm, self.host.keys)
        return reply.data.versions[StateKind.TPM], open_blob(opened)

    async def accept(self) -> AcceptTpmReply:
        reply = await self.client.call(
            STATE_STORE,
            AcceptTpm(vm_id=self.vm_id, requested_by="test"),
            AcceptTpmReply,
            subject=self.vm_id,
            timeout_s=TIMEOUT_S,
        )
        return reply.data

    def resets(self) -> list[TpmReset]:
        return [event for event in self.watcher.of(TpmReset) if isinstance(event, TpmReset)]

    def cleared(self) -> list[TpmResetCleared]:
        return [e for e in self.watcher.of(TpmResetCleared) if isinstance(e, TpmResetCleared)]


async def _scene(redis_url: str, kek: KeyEncryptionKey, depth: int) -> AsyncIterator[Scene]:
    async with memory_store(redis_url, kek, history_depth=depth) as store:
        watcher = Watcher()
        observer = store.broker.client(source="policy/t", origin="policy")
        await observer.consume(
            WATCHED,
            [
                Route(StatePersisted, watcher.on_event),
                Route(TpmReset, watcher.on_event),
                Route(TpmResetCleared, watcher.on_event),
            ],
            prefetch=8,
        )
        yield Scene(store.host, watcher, observer, store.redis, store.vm_id)


@pytest_asyncio.fixture
async def scene(redis_url: str, kek: KeyEncryptionKey) -> AsyncIterator[Scene]:
    async for made in _scene(redis_url, kek, depth=10):
        yield made


@pytest_asyncio.fixture
async def shallow(redis_url: str, kek: KeyEncryptionKey) -> AsyncIterator[Scene]:
    """A store that keeps only two versions per kind."""
    async for made in _scene(redis_url, kek, depth=2):
        yield made


async def test_a_blank_tpm_is_flagged_at_once_and_the_own_one_stays_the_one_handed_out(
    scene: Scene, tpm_states: TpmStates
) -> None:
    own, other = tpm_states.own, tpm_states.other
    assert await scene.persist(own[0]) == 1
    assert await scene.persist(own[1]) == 2
    assert scene.resets() == [], "the same TPM after more writes is not a reset"

    blank = await scene.persist(other[0])
    assert blank == 3
    (reset,) = scene.resets()
    assert (reset.version, reset.previous_good_version) == (3, 2)
    assert reset.found_by is ResetFoundBy.PERSIST
    assert reset.identity == archive_identity(other[0]).fingerprint
    assert reset.previous_identity == archive_identity(own[0]).fingerprint
    assert await scene.newest_tpm() == (2, own[1]), "the hook gets the VM's own TPM"

    assert await scene.persist(other[1]) == 4
    assert len(scene.resets()) == 1, "a reset is announced once, not per version"
    assert await scene.newest_tpm() == (2, own[1])

    done = await scene.accept()
    assert done.ok
    assert (done.version, done.reset_version) == (4, 3)
    (cleared,) = scene.cleared()
    assert (cleared.how, cleared.version, cleared.reset_version) == (ResetClearing.ACCEPTED, 4, 3)
    assert await scene.newest_tpm() == (4, other[1]), "accepted: the newest is handed out"
    assert await scene.persist(_variant(other[1])) == 5
    assert len(scene.resets()) == 1, "the accepted TPM is the VM's own now"


async def test_each_tpm_version_records_the_libtpms_profile_swtpm_made_it_with(
    scene: Scene, tpm_states: TpmStates
) -> None:
    version = await scene.persist(tpm_states.own[0])
    persisted = scene.watcher.of(StatePersisted)[-1]
    assert isinstance(persisted, StatePersisted)
    # A TPM swtpm_setup made with the installed libtpms: before 0.10 it has no profile
    # (Debian 12: libtpms 0.9.2), from 0.10 on the newest profile of that release.
    libtpms = installed_libtpms_version()
    assert libtpms is not None
    release = release_of(libtpms)
    expected = (
        (NULL_PROFILE, NULL_PROFILE_LEVEL)
        if release.newest_profile is None
        else (release.newest_profile, release.highest_level)
    )
    assert (persisted.tpm_profile, persisted.state_format_level) == expected
    history = await read_kind_history(scene.redis, scene.vm_id, StateKind.TPM, {})
    (listed,) = [entry for entry in history.versions if entry.version == version]
    assert (listed.tpm_profile, listed.state_format_level) == expected


async def test_the_own_tpm_persisted_again_ends_the_reset(
    scene: Scene, tpm_states: TpmStates
) -> None:
    own, other = tpm_states.own, tpm_states.other
    await scene.persist(own[0])
    await scene.persist(other[0])
    assert len(scene.resets()) == 1
    # The next start restored the own TPM (v1); the guest ran on it and wrote.
    assert await scene.newest_tpm() == (1, own[0])
    back = await scene.persist(own[1])
    (cleared,) = scene.cleared()
    assert (cleared.how, cleared.version, cleared.reset_version) == (
        ResetClearing.OWN_TPM_BACK,
        back,
        2,
    )
    assert await scene.newest_tpm() == (back, own[1])
    done = await scene.accept()
    assert done.ok
    assert done.reset_version is None


async def test_the_own_tpm_is_never_trimmed_while_a_reset_is_pending(
    shallow: Scene, tpm_states: TpmStates
) -> None:
    own, other = tpm_states.own, tpm_states.other
    await shallow.persist(own[0])
    await shallow.persist(own[1])
    for _ in range(4):
        await shallow.persist(_variant(other[1]))
    assert len(shallow.resets()) == 1
    assert await shallow.newest_tpm() == (2, own[1]), "kept beyond the history depth"
    history = await awaited(
        shallow.redis.lrange(f"{PREFIX}:{{{shallow.vm_id}}}:tpm:history", 0, -1)
    )
    assert [int(v) for v in history] == [2, 5, 6]


async def test_an_unreadable_tpm_where_the_own_was_read_is_never_taken_for_the_same(
    scene: Scene, tpm_states: TpmStates
) -> None:
    await scene.persist(tpm_states.own[0])
    # Encrypted with a secret the store does not hold: its identity cannot be read.
    await scene.persist(tpm_states.encrypted_own[0])
    (reset,) = scene.resets()
    assert reset.version == 2
    assert reset.identity is None
    assert await scene.newest_tpm() == (1, tpm_states.own[0])


async def test_an_encrypted_tpm_is_judged_with_the_secret_the_store_holds(
    scene: Scene, tpm_states: TpmStates
) -> None:
    scene.host.tpm_secrets[scene.vm_id] = TpmSecret(
        uuid=str(uuid.uuid4()), value=SecretBytes(SECRET)
    )
    enc_own, enc_other = tpm_states.encrypted_own, tpm_states.encrypted_other
    await scene.persist(enc_own[0])
    await scene.persist(enc_own[1])
    assert scene.resets() == []
    await scene.persist(enc_other[0])
    (reset,) = scene.resets()
    assert reset.version == 3
    assert reset.identity == archive_identity(enc_other[0], SECRET).fingerprint


async def test_a_restore_hands_out_the_own_tpm_and_refuses_the_unaccepted_one(
    scene: Scene, tpm_states: TpmStates
) -> None:
    await scene.persist(tpm_states.own[0])
    await scene.persist(tpm_states.other[0])

    async def restore(**options: object) -> RestoreStateReply:
        request = RestoreState(vm_id=scene.vm_id, name="vm", host=HOST, epoch=1, **options)  # type: ignore[arg-type]
        reply = await scene.client.call(
            STATE_STORE, request, RestoreStateReply, subject=scene.vm_id, timeout_s=TIMEOUT_S
        )
        return reply.data

    done = await restore()
    assert done.ok
    assert done.versions[StateKind.TPM] == 1
    assert open_blob(scene.host.last_prepared(scene.vm_id).tpm) == tpm_states.own[0]  # type: ignore[arg-type]
    refused = await restore(versions={StateKind.TPM: 2})
    assert not refused.ok
    assert "accept-tpm" in (refused.error or "")
    assert scene.cleared() == []


async def test_content_that_is_no_tpm_identity_is_never_judged(scene: Scene) -> None:
    for index in range(3):
        files = {MAIN_STATE_FILE_NAME: b"not a permall " + bytes([index]) * 64}
        await scene.persist(pack_tpm_state(files))
    assert scene.resets() == []
