"""Clones, export and import, through the bus against real stores.

What is shown:

- ``vm.clone`` with ``copy`` gives the target the source's TPM and NVRAM re-encrypted under
  the target's own data key and binding (version 1, token (0, 0)), so the target's first
  real write is newer; a ciphertext moved between VMs in Redis does not decrypt; with
  ``fresh`` only the NVRAM is copied; a target with state is never overwritten;
- a bundle exported from one store and imported into an EMPTY one (another Redis, another
  KEK) gives byte-identical canonical content; a damaged bundle, a wrong passphrase or a
  truncated bundle is refused with a clear error that carries no secret, and stores nothing.
"""

from __future__ import annotations

import os
import uuid

import pytest
from redis.asyncio import Redis

from keeper_shared.keeper_client.client import KeeperClient, KeeperRequestError
from keeper_shared.messages.state import VersionOrigin
from keeper_shared.messages.transfer import CloneTpm
from keeper_shared.messages.types import FencingToken, StateKind
from keeper_shared.redis_access.results import awaited
from keeper_shared.state_format.tpm_archive import MAIN_STATE_FILE_NAME, pack_tpm_state
from keeper_state_store.crypto.encryption import (
    DecryptionError,
    blob_associated_data,
    decrypt_blob,
)
from support.in_process_store import Store, prepared_content, sha256
from support.leak_scan import content_fingerprints, find_leaks, leak_forms
from support.sealing_keys import new_keys

pytestmark = [pytest.mark.rabbit, pytest.mark.redis]

PASSPHRASE = "export passphrase 0f9e"
TOKEN = FencingToken(epoch=4, generation=17)


async def vm_with_state(store: Store) -> tuple[str, bytes, bytes]:
    """A VM whose TPM and NVRAM the store holds (pulled from the fake host)."""
    vm_id = store.new_vm()
    tpm = pack_tpm_state({MAIN_STATE_FILE_NAME: os.urandom(2000) + b"\x00" * 4000})
    nvram = b"\xff" * 100_000 + os.urandom(3000)
    await store.place(vm_id, epoch=TOKEN.epoch)
    store.host.hold(vm_id, StateKind.TPM, tpm, TOKEN)
    store.host.hold(vm_id, StateKind.NVRAM, nvram, TOKEN)
    await store.pull(vm_id)
    return vm_id, tpm, nvram


async def restore(store: Store, vm_id: str) -> None:
    await store.client.restore_state(vm_id, name="clone-vm", host=store.host.host_id, epoch=1)


# --- Clones --------------------------------------------------------------------------------


async def test_clone_copy_re_encrypts_the_tpm_for_the_target(store: Store) -> None:
    source, tpm, nvram = await vm_with_state(store)
    target = store.new_vm()

    versions = await store.client.clone_vm(source, target, CloneTpm.COPY)

    assert versions == {StateKind.TPM: 1, StateKind.NVRAM: 1}
    history = await store.client.state_history(target)
    for kind_history, content in zip(history.kinds, (tpm, nvram), strict=True):
        (info,) = kind_history.versions
        assert info.version == 1
        assert info.token == FencingToken(epoch=0, generation=0)
        assert info.content_hash == sha256(content)
        assert info.origin is VersionOrigin.CLONE
        assert info.source_vm_id == source
        assert info.host is None

    # The target's ciphertext opens under the target's own key and binding...
    target_key = await store.repository.data_key(target)
    source_key = await store.repository.data_key(source)
    assert target_key != source_key
    target_sealed = await store.sealed(target, StateKind.TPM, 1)
    binding = blob_associated_data(target, "tpm", 0, 0, sha256(tpm))
    assert decrypt_blob(target_key, target_sealed, binding)
    # ...and the source's ciphertext does not, even under the target's binding.
    source_sealed = await store.sealed(source, StateKind.TPM, 1)
    with pytest.raises(DecryptionError):
        decrypt_blob(target_key, source_sealed, binding)
    source_binding = blob_associated_data(source, "tpm", TOKEN.epoch, TOKEN.generation, sha256(tpm))
    assert decrypt_blob(source_key, source_sealed, source_binding)
    with pytest.raises(DecryptionError):
        decrypt_blob(source_key, target_sealed, source_binding)

    # Restoring the clone gives the target the same TPM (same identity) and NVRAM.
    await store.place(target, epoch=1)
    await restore(store, target)
    prepare = store.host.last_prepared(target)
    assert prepared_content(prepare, StateKind.TPM) == tpm
    assert prepared_content(prepare, StateKind.NVRAM) == nvram


async def test_a_ciphertext_swapped_between_vms_is_never_served(store: Store) -> None:
    source, _, _ = await vm_with_state(store)
    target = store.new_vm()
    await store.client.clone_vm(source, target, CloneTpm.COPY)
    # An attacker with Redis access copies the source's ciphertext over the target's.
    source_sealed = await store.sealed(source, StateKind.TPM, 1)
    await store.put_sealed(target, StateKind.TPM, 1, source_sealed)
    await store.place(target, epoch=1)

    with pytest.raises(KeeperRequestError, match="does not verify"):
        await restore(store, target)
    assert all(p.vm_id != target for p in store.host.prepared)


async def test_the_clones_first_real_write_is_newer_than_the_copy(store: Store) -> None:
    source, _, _ = await vm_with_state(store)
    target = store.new_vm()
    await store.client.clone_vm(source, target, CloneTpm.COPY)
    await store.place(target, epoch=1)
    changed = pack_tpm_state({MAIN_STATE_FILE_NAME: b"the clone changed its TPM" * 10})
    store.host.hold(target, StateKind.TPM, changed, FencingToken(epoch=1, generation=0))

    await store.pull(target)

    assert await store.repository.head_version(target, StateKind.TPM) == 2
    assert await store.repository.head_hash(target, StateKind.TPM) == sha256(changed)


async def test_clone_fresh_copies_only_the_nvram(store: Store) -> None:
    source, _, nvram = await vm_with_state(store)
    target = store.new_vm()

    versions = await store.client.clone_vm(source, target, CloneTpm.FRESH)

    assert versions == {StateKind.NVRAM: 1}
    await store.place(target, epoch=1)
    await restore(store, target)
    prepare = store.host.last_prepared(target)
    assert prepare.tpm is None, "a fresh clone gets a new TPM identity"
    assert prepared_content(prepare, StateKind.NVRAM) == nvram


async def test_a_clone_never_overwrites_a_target_that_has_state(store: Store) -> None:
    source, _, _ = await vm_with_state(store)
    target, target_tpm, _ = await vm_with_state(store)

    with pytest.raises(KeeperRequestError, match="already has stored state"):
        await store.client.clone_vm(source, target, CloneTpm.COPY)
    assert await store.repository.head_hash(target, StateKind.TPM) == sha256(target_tpm)
    with pytest.raises(KeeperRequestError, match="onto itself"):
        await store.client.clone_vm(source, source, CloneTpm.COPY)


async def test_a_repeated_clone_is_a_no_op(store: Store) -> None:
    source, _, _ = await vm_with_state(store)
    target = store.new_vm()
    first = await store.client.clone_vm(source, target, CloneTpm.COPY)
    assert await store.client.clone_vm(source, target, CloneTpm.COPY) == first
    assert await store.repository.head_version(target, StateKind.TPM) == 1


async def test_cloning_a_vm_without_state_is_refused(store: Store) -> None:
    with pytest.raises(KeeperRequestError, match="has no stored"):
        await store.client.clone_vm(store.new_vm(), store.new_vm(), CloneTpm.COPY)


# --- Export and import --------------------------------------------------------------------


async def test_export_then_import_into_an_empty_store_is_byte_identical(
    store: Store, empty_store: Store
) -> None:
    vm_id, tpm, nvram = await vm_with_state(store)
    empty_store.vm_ids.append(vm_id)

    bundle = await store.client.export_state(vm_id, PASSPHRASE)
    imported = await empty_store.client.import_state(bundle, PASSPHRASE)

    assert imported == vm_id
    history = await empty_store.client.state_history(vm_id)
    for kind_history, content in zip(history.kinds, (tpm, nvram), strict=True):
        (info,) = kind_history.versions
        assert (info.version, info.content_hash, info.size) == (1, sha256(content), len(content))
        assert info.origin is VersionOrigin.IMPORT
        assert info.token == FencingToken(epoch=0, generation=0)
    await empty_store.place(vm_id, epoch=1)
    await restore(empty_store, vm_id)
    prepare = empty_store.host.last_prepared(vm_id)
    assert prepared_content(prepare, StateKind.TPM) == tpm
    assert prepared_content(prepare, StateKind.NVRAM) == nvram

    # Redis of the importing store holds ciphertext only.
    needles = content_fingerprints(tpm) + content_fingerprints(nvram[-3000:])
    needles += leak_forms(PASSPHRASE.encode())
    assert find_leaks(await _all_values(empty_store.redis), needles) == []
    # The same import again changes nothing; into another VM id it is a new VM's state.
    assert await empty_store.client.import_state(bundle, PASSPHRASE) == vm_id
    other = empty_store.new_vm()
    assert await empty_store.client.import_state(bundle, PASSPHRASE, target_vm_id=other) == other


async def test_a_damaged_bundle_is_refused_and_nothing_is_stored(
    store: Store, empty_store: Store
) -> None:
    vm_id, tpm, _ = await vm_with_state(store)
    empty_store.vm_ids.append(vm_id)
    bundle = await store.client.export_state(vm_id, PASSPHRASE)
    flipped = bytearray(bundle)
    flipped[len(bundle) // 2] ^= 0x04

    authentication = "failed authentication: the passphrase is wrong, or the bundle was"
    attempts = {
        "flipped byte": (bytes(flipped), PASSPHRASE, authentication),
        "wrong passphrase": (bundle, PASSPHRASE + "x", authentication),
        "truncated": (bundle[:-20], PASSPHRASE, authentication),
        "cut to a stub": (bundle[:30], PASSPHRASE, "truncated"),
        "not a bundle": (os.urandom(300), PASSPHRASE, "not a vTPM Keeper bundle"),
    }
    for label, (data, passphrase, expected) in attempts.items():
        with pytest.raises(KeeperRequestError, match="bundle refused") as refused:
            await empty_store.client.import_state(data, passphrase)
        assert expected in str(refused.value), label
        message = str(refused.value).encode()
        needles = leak_forms(PASSPHRASE.encode()) + content_fingerprints(tpm)
        assert find_leaks([(label, message)], needles) == [], label
    assert not await empty_store.repository.has_state(vm_id)


async def test_import_never_overwrites_a_vm_that_has_state(store: Store) -> None:
    vm_id, _, _ = await vm_with_state(store)
    bundle = await store.client.export_state(vm_id, PASSPHRASE)
    other, other_tpm, _ = await vm_with_state(store)

    with pytest.raises(KeeperRequestError, match="already has stored state"):
        await store.client.import_state(bundle, PASSPHRASE, target_vm_id=other)
    assert await store.repository.head_hash(other, StateKind.TPM) == sha256(other_tpm)


async def test_exporting_a_vm_without_state_says_so(store: Store) -> None:
    vm_id = str(uuid.uuid4())
    with pytest.raises(KeeperRequestError, match="has no state"):
        await store.client.export_state(vm_id, PASSPHRASE)


async def test_a_passphrase_is_never_sent_unsealed_nor_opened_under_another_key(
    store: Store, empty_store: Store
) -> None:
    """A client without the store's key refuses to send the passphrase; one pinned to
    another key gets a refusal from the store, and nothing is exported or imported."""
    vm_id, _, _ = await vm_with_state(store)
    bundle = await store.client.export_state(vm_id, PASSPHRASE)
    empty_store.vm_ids.append(vm_id)
    unpinned = KeeperClient(
        store.client._bus, request_timeout_s=10, store_target=store.client._store_target
    )
    wrongly_pinned = KeeperClient(
        store.client._bus,
        request_timeout_s=10,
        store_target=store.client._store_target,
        store_sealing_key=new_keys().public,
    )

    with pytest.raises(KeeperRequestError, match="sealing key is not configured"):
        await unpinned.export_state(vm_id, PASSPHRASE)
    with pytest.raises(KeeperRequestError, match="passphrase refused: sealed for key"):
        await wrongly_pinned.export_state(vm_id, PASSPHRASE)
    with pytest.raises(KeeperRequestError, match="passphrase refused: sealed for key"):
        await KeeperClient(
            empty_store.client._bus,
            request_timeout_s=10,
            store_target=empty_store.client._store_target,
            store_sealing_key=store.service.sealing.own.public,  # not this store's key
        ).import_state(bundle, PASSPHRASE)
    assert await empty_store.repository.head_version(vm_id, StateKind.TPM) is None


async def _all_values(redis: Redis) -> list[tuple[str, bytes]]:
    values: list[tuple[str, bytes]] = []
    async for key in redis.scan_iter(match="keeper:*"):
        kind = (await redis.type(key)).decode()
        if kind == "hash":
            for value in (await awaited(redis.hgetall(key))).values():
                values.append((key.decode(), bytes(value)))
        elif kind == "string":
            values.append((key.decode(), bytes(await redis.get(key))))
    return values
