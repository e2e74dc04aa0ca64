"""Every reader of a stored version takes the same copy and reaches the same verdict.

Restore, export, clone and the scrubber all read through
`keeper_state_store.storage.version_reader`. Here the one version a VM has is pinned by a
snapshot and then its history copy is broken behind the store's back (blob deleted, metadata
deleted, blob flipped): every reader gets the pinned copy's content. Without a pin, every
reader refuses the version with the same reason. Against a real broker and Redis.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable

import pytest

from keeper_shared.keeper_client.client import KeeperRequestError
from keeper_shared.messages.envelope import Payload
from keeper_shared.messages.transfer import CloneTpm
from keeper_shared.messages.types import FencingToken, StateKind
from keeper_shared.redis_access.keys import state_blobs_key, state_flags_key, state_meta_key
from keeper_shared.redis_access.results import awaited
from keeper_shared.state_format.blobs import open_blob
from keeper_state_store.scrub.flags import ScrubFlag
from keeper_state_store.scrub.scrubber import Scrubber
from keeper_state_store.storage.version_reader import VersionReader
from keeper_state_store.transfer.bundle import read_bundle
from support.in_process_store import Store, prepared_content, sha256

pytestmark = [pytest.mark.rabbit, pytest.mark.redis]

KIND = StateKind.NVRAM
PASSPHRASE = "read path passphrase 5c1d"


class ReadRefused(Exception):
    """A reader refused the version; the text is the reason it gave."""


async def _restore(store: Store, vm_id: str) -> str:
    try:
        await store.client.restore_state(vm_id, name="read-path", host=store.host.host_id, epoch=2)
    except KeeperRequestError as error:
        raise ReadRefused(str(error)) from None
    content = prepared_content(store.host.last_prepared(vm_id), KIND)
    assert content is not None
    return sha256(content)


async def _export(store: Store, vm_id: str) -> str:
    try:
        data = await store.client.export_state(vm_id, PASSPHRASE)
    except KeeperRequestError as error:
        raise ReadRefused(str(error)) from None
    (entry,) = read_bundle(data, PASSPHRASE).entries
    return sha256(open_blob(entry.blob))


async def _clone(store: Store, vm_id: str) -> str:
    target = store.new_vm()
    try:
        await store.client.clone_vm(vm_id, target, CloneTpm.COPY)
    except KeeperRequestError as error:
        raise ReadRefused(str(error)) from None
    verified = await VersionReader(store.redis, store.repository.keys).read(target, KIND, 1)
    return sha256(verified.content)


async def _scrub(store: Store, vm_id: str) -> str:
    async def discard(payload: Payload, *, subject: str) -> None:
        del payload, subject

    scrubber = Scrubber(store.redis, store.repository.keys, discard, interval_s=0.0)
    await scrubber.scrub_vm(vm_id, (KIND,))
    raw = await awaited(store.redis.hget(state_flags_key(vm_id, KIND), "1"))
    assert raw is not None
    flag = ScrubFlag.from_json(raw)
    assert flag is not None
    if not flag.ok:
        raise ReadRefused(flag.reason or "")
    assert flag.content_hash is not None
    return flag.content_hash


READERS: dict[str, Callable[[Store, str], Awaitable[str]]] = {
    "restore": _restore,
    "export": _export,
    "clone": _clone,
    "scrubber": _scrub,
}


async def _stored_vm(store: Store, *, pinned: bool) -> tuple[str, bytes]:
    """A VM whose only version (NVRAM version 1) the store holds, pinned when asked."""
    vm_id = store.new_vm()
    content = b"\xff" * 60_000 + os.urandom(2000)
    await store.place(vm_id, epoch=1)
    store.host.hold(vm_id, KIND, content, FencingToken(epoch=1, generation=1))
    await store.pull(vm_id)
    if pinned:
        assert await store.client.create_snapshot(vm_id, "keep") == {KIND: 1}
    return vm_id, content


async def _break_history_copy(store: Store, vm_id: str, damage: str) -> None:
    if damage == "blob deleted":
        await awaited(store.redis.hdel(state_blobs_key(vm_id, KIND), "1"))
    elif damage == "meta deleted":
        await awaited(store.redis.hdel(state_meta_key(vm_id, KIND), "1"))
    else:
        sealed = bytearray(await store.sealed(vm_id, KIND, 1))
        sealed[len(sealed) // 2] ^= 0x01
        await store.put_sealed(vm_id, KIND, 1, bytes(sealed))


@pytest.mark.parametrize("damage", ["blob deleted", "meta deleted", "blob flipped"])
@pytest.mark.parametrize("reader", sorted(READERS))
async def test_every_reader_falls_back_to_the_pinned_copy(
    store: Store, reader: str, damage: str
) -> None:
    vm_id, content = await _stored_vm(store, pinned=True)
    await _break_history_copy(store, vm_id, damage)

    assert await READERS[reader](store, vm_id) == sha256(content)


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        ("blob deleted", "the version's blob is missing"),
        ("meta deleted", "the version's metadata is missing"),
        ("blob flipped", "decryption failed"),
    ],
)
@pytest.mark.parametrize("reader", sorted(READERS))
async def test_without_a_pin_every_reader_refuses_for_the_same_reason(
    store: Store, reader: str, damage: str, reason: str
) -> None:
    vm_id, _ = await _stored_vm(store, pinned=False)
    await _break_history_copy(store, vm_id, damage)

    with pytest.raises(ReadRefused, match=reason):
        await READERS[reader](store, vm_id)
