"""Opening a stored version (`keeper_state_store.storage.version_reader.open_stored_version`)
without Redis: the history's copy when it verifies, the pinned copy when the history's misses
a part or does not verify, and one error naming every copy's fault when none does."""

from __future__ import annotations

import hashlib
import os
import uuid

import pytest

from keeper_shared.messages.types import FencingToken, StateKind
from keeper_shared.state_format.compression import compress
from keeper_state_store.crypto.encryption import (
    DataKey,
    blob_associated_data,
    encrypt_blob,
    new_data_key,
)
from keeper_state_store.storage.repository import version_meta
from keeper_state_store.storage.version_reader import (
    StoredCopy,
    StoredVersion,
    VersionCopy,
    VersionUnreadableError,
    open_stored_version,
)

KIND = StateKind.NVRAM
TOKEN = FencingToken(epoch=2, generation=5)
CONTENT = b"\xff" * 4096 + os.urandom(256)


def _copy(vm_id: str, data_key: DataKey, where: VersionCopy) -> StoredCopy:
    """A sound copy of version 1 holding ``CONTENT``, as the store writes it."""
    digest = hashlib.sha256(CONTENT).hexdigest()
    binding = blob_associated_data(vm_id, KIND.value, TOKEN.epoch, TOKEN.generation, digest)
    meta = version_meta(content_hash=digest, size=len(CONTENT), token=TOKEN, host="host-a")
    return StoredCopy(where, meta, encrypt_blob(data_key, compress(CONTENT), binding))


def _flipped(sealed: bytes | None) -> bytes:
    assert sealed is not None
    damaged = bytearray(sealed)
    damaged[len(damaged) // 2] ^= 0x01
    return bytes(damaged)


@pytest.fixture
def vm_id() -> str:
    return str(uuid.uuid4())


@pytest.fixture
def data_key() -> DataKey:
    return new_data_key()


def test_a_sound_history_copy_is_read_from_the_history(vm_id: str, data_key: DataKey) -> None:
    history = _copy(vm_id, data_key, VersionCopy.HISTORY)
    pinned = _copy(vm_id, data_key, VersionCopy.PINNED)

    verified = open_stored_version(StoredVersion(vm_id, KIND, 1, (history, pinned)), data_key)

    assert verified.copy is VersionCopy.HISTORY
    assert verified.history_fault is None
    assert verified.content == CONTENT
    assert verified.blob.content_hash == hashlib.sha256(CONTENT).hexdigest()
    assert verified.record.version == 1
    assert verified.record.token == TOKEN


@pytest.mark.parametrize(
    ("damage", "fault"),
    [
        ("meta missing", "the version's metadata is missing"),
        ("blob missing", "the version's blob is missing"),
        ("meta damaged", "the version's metadata is unreadable"),
        ("blob damaged", "decryption failed"),
    ],
)
def test_a_history_copy_missing_a_part_or_damaged_falls_back_to_the_pinned_copy(
    vm_id: str, data_key: DataKey, damage: str, fault: str
) -> None:
    sound = _copy(vm_id, data_key, VersionCopy.HISTORY)
    history = {
        "meta missing": StoredCopy(VersionCopy.HISTORY, None, sound.sealed),
        "blob missing": StoredCopy(VersionCopy.HISTORY, sound.meta, None),
        "meta damaged": StoredCopy(VersionCopy.HISTORY, b"\x07garbage", sound.sealed),
        "blob damaged": StoredCopy(VersionCopy.HISTORY, sound.meta, _flipped(sound.sealed)),
    }[damage]
    pinned = _copy(vm_id, data_key, VersionCopy.PINNED)

    verified = open_stored_version(StoredVersion(vm_id, KIND, 1, (history, pinned)), data_key)

    assert verified.copy is VersionCopy.PINNED
    assert verified.content == CONTENT
    assert verified.history_fault is not None
    assert fault in verified.history_fault


def test_without_a_pinned_copy_the_history_copys_fault_is_the_error(
    vm_id: str, data_key: DataKey
) -> None:
    sound = _copy(vm_id, data_key, VersionCopy.HISTORY)
    history = StoredCopy(VersionCopy.HISTORY, sound.meta, None)

    with pytest.raises(VersionUnreadableError, match=r"^the version's blob is missing$"):
        open_stored_version(StoredVersion(vm_id, KIND, 1, (history,)), data_key)


def test_when_no_copy_verifies_the_error_names_each_copys_fault(
    vm_id: str, data_key: DataKey
) -> None:
    sound = _copy(vm_id, data_key, VersionCopy.HISTORY)
    history = StoredCopy(VersionCopy.HISTORY, sound.meta, None)
    pinned = StoredCopy(VersionCopy.PINNED, sound.meta, _flipped(sound.sealed))

    with pytest.raises(VersionUnreadableError) as caught:
        open_stored_version(StoredVersion(vm_id, KIND, 1, (history, pinned)), data_key)

    assert str(caught.value).startswith("history copy: the version's blob is missing; ")
    assert "pinned copy: decryption failed" in str(caught.value)


def test_a_hash_that_does_not_match_is_refused_not_returned(vm_id: str, data_key: DataKey) -> None:
    other = hashlib.sha256(b"other").hexdigest()
    binding = blob_associated_data(vm_id, KIND.value, TOKEN.epoch, TOKEN.generation, other)
    meta = version_meta(content_hash=other, size=len(CONTENT), token=TOKEN, host="host-a")
    copy = StoredCopy(VersionCopy.HISTORY, meta, encrypt_blob(data_key, compress(CONTENT), binding))

    with pytest.raises(VersionUnreadableError, match="does not match the recorded"):
        open_stored_version(StoredVersion(vm_id, KIND, 1, (copy,)), data_key)


def test_a_ciphertext_of_another_vm_does_not_open(vm_id: str, data_key: DataKey) -> None:
    foreign = _copy(str(uuid.uuid4()), data_key, VersionCopy.HISTORY)

    with pytest.raises(VersionUnreadableError, match="decryption failed"):
        open_stored_version(StoredVersion(vm_id, KIND, 1, (foreign,)), data_key)


def test_the_record_comes_from_the_first_copy_whose_metadata_parses(
    vm_id: str, data_key: DataKey
) -> None:
    sound = _copy(vm_id, data_key, VersionCopy.PINNED)
    history = StoredCopy(VersionCopy.HISTORY, b"\x07garbage", None)

    record = StoredVersion(vm_id, KIND, 3, (history, sound)).record()

    assert record is not None
    assert record.version == 3
    assert record.token == TOKEN
    assert StoredVersion(vm_id, KIND, 3, (history,)).record() is None
