"""The store and the libvirt secrets of encrypted TPM states, on the real broker and Redis.

A VM whose TPM is to be encrypted gets one secret, made on its first restore and sent in
every later ``vm.prepare``; a secret a host read from a domain (one the keeper did not
create) is kept and sent from then on. Clones, exports and imports take it with the
TPM state it encrypts. Redis never holds a value in clear.
"""

from __future__ import annotations

import os
import uuid

import pytest
from pydantic import SecretBytes

from keeper_shared.messages.replies import RestoreStateReply
from keeper_shared.messages.transfer import CloneTpm
from keeper_shared.messages.types import FencingToken, StateKind, TpmSecret
from keeper_shared.redis_access.keys import tpm_secret_key
from keeper_shared.state_format.tpm_archive import MAIN_STATE_FILE_NAME, pack_tpm_state
from support.in_process_store import Store
from support.leak_scan import find_leaks, leak_forms

pytestmark = [pytest.mark.rabbit, pytest.mark.redis]

PASSPHRASE = "export passphrase 7c1d"


async def _restore(store: Store, vm_id: str, epoch: int, *, encrypt: bool) -> RestoreStateReply:
    return await store.client.restore_state(
        vm_id, name="enc-vm", host=store.host.host_id, epoch=epoch, encrypt_tpm_state=encrypt
    )


async def _stored_record(store: Store, vm_id: str) -> bytes:
    stored = await store.redis.get(tpm_secret_key(vm_id))
    assert stored is not None, "the store keeps no secret for the VM"
    return bytes(stored)


async def test_an_encrypted_vm_gets_one_secret_made_once_and_sent_every_time(
    store: Store,
) -> None:
    vm_id = store.new_vm()
    await store.place(vm_id, epoch=1)

    first = await _restore(store, vm_id, 1, encrypt=True)

    prepared = store.host.last_prepared(vm_id)
    assert prepared.tpm is None  # a new VM: swtpm manufactures its TPM, encrypted
    secret = prepared.tpm_secret
    assert secret is not None
    assert first.tpm_secret_uuid == secret.uuid
    value = secret.value.get_secret_value()
    assert len(value) >= 32
    stored = await _stored_record(store, vm_id)
    assert find_leaks([("redis", stored)], leak_forms(value)) == []

    await store.place(vm_id, epoch=2)
    second = await _restore(store, vm_id, 2, encrypt=True)
    again = store.host.last_prepared(vm_id).tpm_secret
    assert again == secret
    assert second.tpm_secret_uuid == secret.uuid
    assert await _stored_record(store, vm_id) == stored


async def test_a_vm_without_encryption_gets_no_secret(store: Store) -> None:
    vm_id = store.new_vm()
    await store.place(vm_id, epoch=1)

    detail = await _restore(store, vm_id, 1, encrypt=False)

    assert store.host.last_prepared(vm_id).tpm_secret is None
    assert detail.tpm_secret_uuid is None
    assert await store.redis.get(tpm_secret_key(vm_id)) is None


async def test_a_secret_the_host_read_is_kept_and_sent_with_the_state(store: Store) -> None:
    """A domain defined outside the keeper, with its own (non-private) secret: the fetch
    reply carries it, and the restore elsewhere sends it under the same UUID."""
    vm_id = store.new_vm()
    await store.place(vm_id, epoch=1)
    foreign = TpmSecret(uuid=str(uuid.uuid4()), value=SecretBytes(os.urandom(32)))
    token = FencingToken(epoch=1, generation=1)
    store.host.hold(vm_id, StateKind.TPM, b"encrypted swtpm state", token)
    store.host.tpm_secrets[vm_id] = foreign

    await store.pull(vm_id)
    stored = await _stored_record(store, vm_id)
    assert find_leaks([("redis", stored)], leak_forms(foreign.value.get_secret_value())) == []
    await store.place(vm_id, epoch=2)
    detail = await _restore(store, vm_id, 2, encrypt=False)

    prepared = store.host.last_prepared(vm_id)
    assert prepared.tpm is not None
    assert prepared.tpm_secret == foreign
    assert detail.tpm_secret_uuid == foreign.uuid

    # Pulled again unchanged: nothing rewritten.
    await store.pull(vm_id)
    assert await _stored_record(store, vm_id) == stored


async def _encrypted_vm_with_state(store: Store) -> tuple[str, TpmSecret]:
    """A VM whose TPM is encrypted (its secret made by a restore) and whose state the
    store holds."""
    vm_id = store.new_vm()
    await store.place(vm_id, epoch=1)
    await _restore(store, vm_id, 1, encrypt=True)
    secret = store.host.last_prepared(vm_id).tpm_secret
    assert secret is not None
    tpm = pack_tpm_state({MAIN_STATE_FILE_NAME: os.urandom(2000) + b"\x00" * 4000})
    token = FencingToken(epoch=1, generation=1)
    store.host.hold(vm_id, StateKind.TPM, tpm, token)
    store.host.hold(vm_id, StateKind.NVRAM, b"\xff" * 4096, token)
    await store.pull(vm_id)
    return vm_id, secret


async def test_a_clone_of_an_encrypted_tpm_gets_the_value_under_its_own_uuid(
    store: Store,
) -> None:
    """The copied state is encrypted with the source's value; the target's libvirt secret
    is its own (a host may hold both VMs), so only the UUID differs."""
    source, secret = await _encrypted_vm_with_state(store)
    target = store.new_vm()

    await store.client.clone_vm(source, target, CloneTpm.COPY)
    await store.place(target, epoch=1)
    await _restore(store, target, 1, encrypt=True)

    cloned = store.host.last_prepared(target).tpm_secret
    assert cloned is not None
    assert cloned.value == secret.value
    assert cloned.uuid != secret.uuid

    fresh = store.new_vm()
    await store.client.clone_vm(source, fresh, CloneTpm.FRESH)
    assert await store.redis.get(tpm_secret_key(fresh)) is None


async def test_export_and_import_carry_the_secret_sealed_in_the_bundle(
    store: Store, empty_store: Store
) -> None:
    vm_id, secret = await _encrypted_vm_with_state(store)
    empty_store.vm_ids.append(vm_id)

    bundle = await store.client.export_state(vm_id, PASSPHRASE)
    assert find_leaks([("bundle", bundle)], leak_forms(secret.value.get_secret_value())) == []
    assert await empty_store.client.import_state(bundle, PASSPHRASE) == vm_id
    await empty_store.place(vm_id, epoch=1)
    await _restore(empty_store, vm_id, 1, encrypt=True)

    assert empty_store.host.last_prepared(vm_id).tpm_secret == secret
    other = empty_store.new_vm()
    assert await empty_store.client.import_state(bundle, PASSPHRASE, target_vm_id=other) == other
    await empty_store.place(other, epoch=1)
    await _restore(empty_store, other, 1, encrypt=False)
    imported = empty_store.host.last_prepared(other).tpm_secret
    assert imported is not None
    assert imported.value == secret.value
    assert imported.uuid != secret.uuid
