"""History, restore by version and snapshots, through the bus against a real store.

The store runs in process (real `StateService` etc. on a real broker and Redis) with a fake
host agent answering its fetches and prepares (see support.in_process_store). What is shown:

- ``state.history`` lists every kept version with its metadata and the scrubber's flags;
- a restore sends the chosen version, verified; an older version over newer state only
  with ``allow_older``, and the refusal names both versions; a version that no longer
  decrypts and verifies is never sent;
- a snapshot pins versions that history trimming then drops from the history, and a
  restore from the snapshot still gets them; snapshots are idempotent by name, and
  deleting one unpins only what no other snapshot pins.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from keeper_shared.keeper_client.client import KeeperRequestError
from keeper_shared.messages.replies import RestoreStateReply
from keeper_shared.messages.state import VersionOrigin
from keeper_shared.messages.types import FencingToken, StateKind
from keeper_shared.redis_access.keys import state_flags_key
from keeper_shared.redis_access.results import awaited
from keeper_shared.state_format.blobs import seal_blob
from keeper_shared.state_format.tpm_archive import MAIN_STATE_FILE_NAME, pack_tpm_state
from keeper_state_store.crypto.encryption import KeyEncryptionKey
from support.in_process_store import Store, prepared_content, running_store, sha256

pytestmark = [pytest.mark.rabbit, pytest.mark.redis]

HISTORY_DEPTH = 3
VM_NAME = "history-vm"


@pytest_asyncio.fixture
async def store(rabbitmq_url: str, redis_url: str, kek: KeyEncryptionKey) -> AsyncIterator[Store]:
    async with running_store(rabbitmq_url, redis_url, kek, history_depth=HISTORY_DEPTH) as s:
        yield s


def tpm_content(label: str) -> bytes:
    """A valid swtpm state archive whose permall differs per label."""
    return pack_tpm_state({MAIN_STATE_FILE_NAME: label.encode() * 200 + os.urandom(64)})


async def write_versions(store: Store, vm_id: str, count: int, *, epoch: int = 1) -> list[bytes]:
    """Have the host change the TPM ``count`` times, each change pulled and persisted."""
    contents = []
    for generation in range(1, count + 1):
        content = tpm_content(f"gen {generation}")
        store.host.hold(
            vm_id, StateKind.TPM, content, FencingToken(epoch=epoch, generation=generation)
        )
        await store.pull(vm_id)
        contents.append(content)
    return contents


async def restore(store: Store, vm_id: str, **choice: object) -> RestoreStateReply:
    return await store.client.restore_state(
        vm_id,
        name=VM_NAME,
        host=store.host.host_id,
        epoch=2,
        **choice,  # type: ignore[arg-type]
    )


async def test_history_lists_every_kept_version_with_metadata_and_flags(store: Store) -> None:
    vm_id = store.new_vm()
    await store.place(vm_id, epoch=1)
    nvram = os.urandom(1000) * 4
    store.host.hold(vm_id, StateKind.NVRAM, nvram, FencingToken(epoch=1, generation=0))
    tpm = await write_versions(store, vm_id, 3)
    flag = {"ok": False, "reason": "hash mismatch", "ek_changed": False}
    await awaited(store.redis.hset(state_flags_key(vm_id, StateKind.TPM), "2", json.dumps(flag)))

    history = await store.client.state_history(vm_id)

    assert history.vm_id == vm_id
    by_kind = {entry.kind: entry for entry in history.kinds}
    assert [entry.kind for entry in history.kinds] == [StateKind.TPM, StateKind.NVRAM]
    tpm_history = by_kind[StateKind.TPM]
    assert tpm_history.head_version == 3
    assert [v.version for v in tpm_history.versions] == [1, 2, 3]
    for info, content in zip(tpm_history.versions, tpm, strict=True):
        assert info.content_hash == sha256(content)
        assert info.size == len(content)
        assert info.token == FencingToken(epoch=1, generation=info.version)
        assert info.host == store.host.host_id
        assert info.origin is VersionOrigin.HOST
        assert info.in_history
        assert info.snapshots == []
    assert [v.flags for v in tpm_history.versions] == [{}, flag, {}]
    assert tpm_history.versions[0].stored_at <= tpm_history.versions[2].stored_at
    nvram_history = by_kind[StateKind.NVRAM]
    assert nvram_history.head_version == 1
    assert [(v.version, v.content_hash) for v in nvram_history.versions] == [(1, sha256(nvram))]


async def test_history_of_a_vm_without_state_is_empty(store: Store) -> None:
    history = await store.client.state_history(store.new_vm())
    assert [(k.head_version, k.versions) for k in history.kinds] == [(None, []), (None, [])]


async def test_restore_sends_newest_by_default_and_a_chosen_version_when_asked(
    store: Store,
) -> None:
    vm_id = store.new_vm()
    await store.place(vm_id, epoch=1)
    contents = await write_versions(store, vm_id, 3)

    detail = await restore(store, vm_id)
    assert prepared_content(store.host.last_prepared(vm_id), StateKind.TPM) == contents[2]
    assert detail.versions[StateKind.TPM] == 3

    detail = await restore(store, vm_id, versions={StateKind.TPM: 2}, allow_older=True)
    prepare = store.host.last_prepared(vm_id)
    assert prepared_content(prepare, StateKind.TPM) == contents[1]
    assert prepare.tpm is not None
    assert prepare.tpm.token == FencingToken(epoch=1, generation=2)
    assert detail.versions[StateKind.TPM] == 2

    # Naming the newest version explicitly is not a rollback.
    await restore(store, vm_id, versions={StateKind.TPM: 3})
    assert prepared_content(store.host.last_prepared(vm_id), StateKind.TPM) == contents[2]


async def test_an_older_version_over_newer_state_needs_allow_older(store: Store) -> None:
    vm_id = store.new_vm()
    await store.place(vm_id, epoch=1)
    await write_versions(store, vm_id, 3)
    prepares_before = len(store.host.prepared)

    with pytest.raises(KeeperRequestError) as refused:
        await restore(store, vm_id, versions={StateKind.TPM: 1})

    message = str(refused.value)
    assert "tpm version 1" in message
    assert "newer version 3" in message
    assert "allow_older" in message
    assert len(store.host.prepared) == prepares_before, "nothing may reach the host"


async def test_a_version_that_is_not_kept_is_refused(store: Store) -> None:
    vm_id = store.new_vm()
    await store.place(vm_id, epoch=1)
    await write_versions(store, vm_id, HISTORY_DEPTH + 2)  # versions 1 and 2 are trimmed

    for version in (1, HISTORY_DEPTH + 3):
        with pytest.raises(KeeperRequestError, match=rf"tpm version {version} .* not"):
            await restore(store, vm_id, versions={StateKind.TPM: version}, allow_older=True)


async def test_a_stored_version_that_does_not_verify_is_never_sent(store: Store) -> None:
    vm_id = store.new_vm()
    await store.place(vm_id, epoch=1)
    await write_versions(store, vm_id, 2)
    sealed = bytearray(await store.sealed(vm_id, StateKind.TPM, 1))
    sealed[-5] ^= 0x01  # corrupt version 1 at rest
    await store.put_sealed(vm_id, StateKind.TPM, 1, bytes(sealed))
    prepares_before = len(store.host.prepared)

    with pytest.raises(KeeperRequestError, match="does not verify"):
        await restore(store, vm_id, versions={StateKind.TPM: 1}, allow_older=True)
    assert len(store.host.prepared) == prepares_before
    await restore(store, vm_id)  # the newest is intact and still restores


async def test_snapshot_pins_survive_history_trimming(store: Store) -> None:
    vm_id = store.new_vm()
    await store.place(vm_id, epoch=1)
    nvram = os.urandom(512) * 8
    store.host.hold(vm_id, StateKind.NVRAM, nvram, FencingToken(epoch=1, generation=0))
    first = (await write_versions(store, vm_id, 1))[0]

    pinned = await store.client.create_snapshot(vm_id, "before-upgrade")
    assert pinned == {StateKind.TPM: 1, StateKind.NVRAM: 1}
    # The same name again while nothing changed: a no-op, same answer.
    assert await store.client.create_snapshot(vm_id, "before-upgrade") == pinned

    # Enough new versions that the history (depth 3) drops version 1.
    for generation in range(2, HISTORY_DEPTH + 3):
        store.host.hold(
            vm_id,
            StateKind.TPM,
            tpm_content(f"later {generation}"),
            FencingToken(epoch=1, generation=generation),
        )
        await store.pull(vm_id)

    history = await store.client.state_history(vm_id)
    tpm_history = history.kinds[0]
    assert tpm_history.head_version == HISTORY_DEPTH + 2
    assert [v.version for v in tpm_history.versions] == [1, 3, 4, 5]
    oldest = tpm_history.versions[0]
    assert not oldest.in_history
    assert oldest.snapshots == ["before-upgrade"]
    assert oldest.content_hash == sha256(first)

    # Restoring the snapshot rolls the TPM back, so it must be asked for explicitly.
    with pytest.raises(KeeperRequestError, match=r"tpm version 1 .* newer version 5"):
        await restore(store, vm_id, snapshot_id="before-upgrade")
    await restore(store, vm_id, snapshot_id="before-upgrade", allow_older=True)
    prepare = store.host.last_prepared(vm_id)
    assert prepared_content(prepare, StateKind.TPM) == first
    assert prepared_content(prepare, StateKind.NVRAM) == nvram

    # The name now stands for other versions than the newest: creating it again is refused.
    with pytest.raises(KeeperRequestError, match="already pins other versions"):
        await store.client.create_snapshot(vm_id, "before-upgrade")

    listed = await store.client.list_snapshots(vm_id)
    assert [(s.snapshot_id, s.versions) for s in listed] == [("before-upgrade", pinned)]

    assert await store.client.unpin_snapshot(vm_id, "before-upgrade")
    assert not await store.client.unpin_snapshot(vm_id, "before-upgrade")
    history = await store.client.state_history(vm_id)
    assert [v.version for v in history.kinds[0].versions] == [3, 4, 5]
    with pytest.raises(KeeperRequestError, match="not"):
        await restore(store, vm_id, versions={StateKind.TPM: 1}, allow_older=True)
    with pytest.raises(KeeperRequestError, match="no snapshot 'before-upgrade'"):
        await restore(store, vm_id, snapshot_id="before-upgrade", allow_older=True)


async def test_a_version_pinned_twice_stays_pinned_until_the_last_snapshot_goes(
    store: Store,
) -> None:
    vm_id = store.new_vm()
    await store.place(vm_id, epoch=1)
    await write_versions(store, vm_id, 1)
    await store.client.create_snapshot(vm_id, "a")
    await store.client.create_snapshot(vm_id, "b")
    store.host.hold(vm_id, StateKind.TPM, tpm_content("x"), FencingToken(epoch=1, generation=9))
    await store.pull(vm_id)
    await store.client.create_snapshot(vm_id, "c")  # pins version 2
    for generation in range(10, 10 + HISTORY_DEPTH):
        store.host.hold(
            vm_id,
            StateKind.TPM,
            tpm_content(str(generation)),
            FencingToken(epoch=1, generation=generation),
        )
        await store.pull(vm_id)

    assert await store.client.unpin_snapshot(vm_id, "a")
    versions = (await store.client.state_history(vm_id)).kinds[0].versions
    assert [(v.version, v.snapshots) for v in versions if not v.in_history] == [
        (1, ["b"]),
        (2, ["c"]),
    ]
    await restore(store, vm_id, snapshot_id="b", allow_older=True)

    assert await store.client.unpin_snapshot(vm_id, "b")
    versions = (await store.client.state_history(vm_id)).kinds[0].versions
    assert [v.version for v in versions if not v.in_history] == [2]


async def test_a_snapshot_of_a_vm_without_state_is_refused(store: Store) -> None:
    with pytest.raises(KeeperRequestError, match="no stored state to pin"):
        await store.client.create_snapshot(store.new_vm(), "empty")


async def test_each_version_records_the_swtpm_version_that_read_it(store: Store) -> None:
    vm_id = store.new_vm()
    await store.place(vm_id, epoch=1)
    for generation, swtpm in ((1, "0.7.1"), (2, "0.8.0")):
        blob = seal_blob(
            StateKind.TPM,
            tpm_content(f"swtpm {swtpm}"),
            FencingToken(epoch=1, generation=generation),
            swtpm_version=swtpm,
        )
        store.host.state.setdefault(vm_id, {})[StateKind.TPM] = blob
        await store.pull(vm_id)

    history = await store.client.state_history(vm_id)
    (tpm,) = [kind for kind in history.kinds if kind.kind is StateKind.TPM]
    assert [(info.version, info.swtpm_version) for info in tpm.versions] == [
        (1, "0.7.1"),
        (2, "0.8.0"),
    ]
