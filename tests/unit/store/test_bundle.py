"""The export bundle format (`keeper_state_store.transfer.bundle`): round trip, and every kind
of damage refused before anything is returned, with errors that never carry the passphrase or state.

A bundle is authenticated as a whole (the header is the AES-GCM associated data), so a
flipped byte anywhere, a wrong passphrase, truncation or extra bytes all fail. Content
from a bundle made with the right passphrase is verified anyway (hash, bounded
decompression, TPM archive rules), because whoever made it may be the attacker.
"""

from __future__ import annotations

import dataclasses
import os
import struct
import zlib
from datetime import UTC, datetime

import pytest
from pydantic import SecretBytes

from keeper_shared.messages.types import FencingToken, StateBlob, StateKind, TpmSecret
from keeper_shared.state_format.blobs import open_blob, seal_blob
from keeper_shared.state_format.tpm_archive import MAIN_STATE_FILE_NAME, pack_tpm_state
from keeper_state_store.transfer import bundle as bundle_module
from keeper_state_store.transfer.bundle import (
    HEADER_SIZE,
    MAGIC,
    Bundle,
    BundleAuthenticationError,
    BundleContentError,
    BundleEntry,
    BundleError,
    BundleFormatError,
    ScryptParams,
    read_bundle,
    write_bundle,
)
from support.leak_scan import content_fingerprints, leak_forms

VM_ID = "6c1b2a3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d"
PASSPHRASE = "correct horse battery staple"
FAST = ScryptParams(log2_n=14, r=8, p=1)
"""The cheapest parameters a reader accepts, to keep the many reads below quick."""

PERMALL = os.urandom(3000) + b"\x00" * 3000
NVRAM = b"\xff" * 500_000 + os.urandom(2000)


def _entry(blob: StateBlob, version: int) -> BundleEntry:
    return BundleEntry(
        blob=blob, version=version, host="host-a", stored_at=datetime(2024, 5, 1, tzinfo=UTC)
    )


def _bundle(*entries: BundleEntry) -> Bundle:
    if not entries:
        token = FencingToken(epoch=3, generation=7)
        tpm = seal_blob(StateKind.TPM, pack_tpm_state({MAIN_STATE_FILE_NAME: PERMALL}), token)
        entries = (_entry(tpm, 4), _entry(seal_blob(StateKind.NVRAM, NVRAM, token), 2))
    return Bundle(vm_id=VM_ID, exported_at=datetime.now(UTC), entries=entries)


@pytest.fixture(scope="module")
def sealed() -> bytes:
    return write_bundle(_bundle(), PASSPHRASE, FAST)


def _assert_safe(error: BaseException) -> None:
    """No form of the passphrase or the state in the message, and no exception chain."""
    text = str(error).encode()
    needles = leak_forms(PASSPHRASE.encode()) + content_fingerprints(PERMALL)
    needles += content_fingerprints(NVRAM[-2000:])
    assert not any(needle in text for needle in needles), str(error)
    assert error.__cause__ is None
    assert error.__context__ is None or error.__suppress_context__


def test_round_trip_gives_the_same_state_and_metadata() -> None:
    original = _bundle()
    data = write_bundle(original, PASSPHRASE)  # the default (production) parameters

    assert data.startswith(MAGIC)
    back = read_bundle(data, PASSPHRASE)

    assert back.vm_id == VM_ID
    assert back.exported_at == original.exported_at
    tpm, nvram = back.entry(StateKind.TPM), back.entry(StateKind.NVRAM)
    assert tpm is not None
    assert nvram is not None
    assert open_blob(tpm.blob) == pack_tpm_state({MAIN_STATE_FILE_NAME: PERMALL})
    assert open_blob(nvram.blob) == NVRAM
    for before, after in zip(original.entries, back.entries, strict=True):
        assert after.version == before.version
        assert after.host == before.host
        assert after.stored_at == before.stored_at
        assert after.blob.token == before.blob.token
        assert after.blob.content_hash == before.blob.content_hash
        assert after.blob.size == before.blob.size


def test_nothing_of_the_state_or_passphrase_is_readable_in_the_file(sealed: bytes) -> None:
    needles = leak_forms(PASSPHRASE.encode()) + content_fingerprints(PERMALL)
    assert not any(needle in sealed for needle in needles)
    # The manifest is encrypted too: not even the VM id shows.
    assert VM_ID.encode() not in sealed


def test_two_exports_of_the_same_state_differ(sealed: bytes) -> None:
    """A fresh salt and nonce every time: equal bundles would reveal equal state."""
    assert write_bundle(_bundle(), PASSPHRASE, FAST) != sealed


REGIONS = {
    "magic": 0,
    "format version": 8,
    "kdf id": 9,
    "log2 n": 10,
    "r": 11,
    "p": 12,
    "salt": 20,
    "nonce": 35,
    "ciphertext start": HEADER_SIZE,
    "ciphertext middle": -2000,
    "tag": -1,
}


@pytest.mark.parametrize("offset", REGIONS.values(), ids=list(REGIONS))
def test_a_flipped_byte_anywhere_is_refused(sealed: bytes, offset: int) -> None:
    damaged = bytearray(sealed)
    damaged[offset] ^= 0x01
    with pytest.raises(BundleError) as caught:
        read_bundle(bytes(damaged), PASSPHRASE)
    _assert_safe(caught.value)


def test_a_flipped_ciphertext_byte_says_authentication_failed(sealed: bytes) -> None:
    damaged = bytearray(sealed)
    damaged[HEADER_SIZE + 5] ^= 0x80
    with pytest.raises(BundleAuthenticationError, match="passphrase is wrong, or the bundle"):
        read_bundle(bytes(damaged), PASSPHRASE)


def test_wrong_passphrase_is_refused_without_revealing_either(sealed: bytes) -> None:
    with pytest.raises(BundleAuthenticationError) as caught:
        read_bundle(sealed, PASSPHRASE + "!")
    _assert_safe(caught.value)
    assert "!" not in str(caught.value)


@pytest.mark.parametrize("keep", [0, 7, HEADER_SIZE - 1, HEADER_SIZE, HEADER_SIZE + 16, -1])
def test_truncated_bundles_are_refused(sealed: bytes, keep: int) -> None:
    with pytest.raises(BundleError) as caught:
        read_bundle(sealed[:keep], PASSPHRASE)
    _assert_safe(caught.value)


def test_appended_bytes_are_refused(sealed: bytes) -> None:
    with pytest.raises(BundleAuthenticationError):
        read_bundle(sealed + b"\x00", PASSPHRASE)


def test_something_else_is_not_a_bundle() -> None:
    with pytest.raises(BundleFormatError, match="not a vTPM Keeper bundle"):
        read_bundle(os.urandom(200), PASSPHRASE)


def test_kdf_parameters_that_would_exhaust_memory_are_refused_before_deriving(
    sealed: bytes,
) -> None:
    damaged = bytearray(sealed)
    damaged[10] = 30  # log2(n) = 30: 128 GiB of scrypt memory
    with pytest.raises(BundleFormatError, match="out of range"):
        read_bundle(bytes(damaged), PASSPHRASE)
    damaged[10] = 20  # 1 GiB with r = 8: still more than a reader allows
    with pytest.raises(BundleFormatError, match="MiB"):
        read_bundle(bytes(damaged), PASSPHRASE)


def test_empty_passphrase_is_refused() -> None:
    with pytest.raises(BundleError, match="must not be empty"):
        write_bundle(_bundle(), "", FAST)


def test_an_empty_bundle_cannot_be_written() -> None:
    with pytest.raises(BundleContentError, match="no state"):
        write_bundle(Bundle(vm_id=VM_ID, exported_at=datetime.now(UTC), entries=()), "p" * 8)


# --- Bundles made with the right passphrase by someone who lies about the content ---------


def _unverified_write(monkeypatch: pytest.MonkeyPatch, bundle: Bundle) -> bytes:
    """Write without the writer's own checks, as a hostile tool would."""
    with monkeypatch.context() as patch:
        patch.setattr(bundle_module, "_verify_content", lambda _blob: None)
        return write_bundle(bundle, PASSPHRASE, FAST)


def test_content_whose_hash_does_not_match_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    honest = seal_blob(StateKind.NVRAM, NVRAM, FencingToken(epoch=1, generation=1))
    lying = honest.model_copy(update={"content_hash": "0" * 64})
    data = _unverified_write(monkeypatch, _bundle(_entry(lying, 1)))

    with pytest.raises(BundleContentError, match="nvram state in the bundle does not verify") as c:
        read_bundle(data, PASSPHRASE)
    _assert_safe(c.value)


def test_a_decompression_bomb_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    bomb = StateBlob(
        kind=StateKind.NVRAM,
        content_hash="0" * 64,
        size=1024,
        token=FencingToken(epoch=1, generation=1),
        compressed=SecretBytes(zlib.compress(b"\x00" * (64 * 1024 * 1024))),
    )
    data = _unverified_write(monkeypatch, _bundle(_entry(bomb, 1)))

    with pytest.raises(BundleContentError, match="inflates to more than"):
        read_bundle(data, PASSPHRASE)


def test_tpm_state_that_is_not_a_safe_archive_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    # The hash is right: only the archive check can catch it.
    not_an_archive = seal_blob(StateKind.TPM, PERMALL, FencingToken(epoch=1, generation=1))
    data = _unverified_write(monkeypatch, _bundle(_entry(not_an_archive, 1)))

    with pytest.raises(BundleContentError, match="tpm state in the bundle does not verify") as c:
        read_bundle(data, PASSPHRASE)
    _assert_safe(c.value)


def test_the_writer_refuses_what_the_reader_would() -> None:
    not_an_archive = seal_blob(StateKind.TPM, PERMALL, FencingToken(epoch=1, generation=1))
    with pytest.raises(BundleContentError):
        write_bundle(_bundle(_entry(not_an_archive, 1)), PASSPHRASE, FAST)


def test_the_same_kind_twice_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    nvram = seal_blob(StateKind.NVRAM, NVRAM, FencingToken(epoch=1, generation=1))
    with pytest.raises(BundleContentError, match="twice"):
        write_bundle(_bundle(_entry(nvram, 1), _entry(nvram, 2)), PASSPHRASE, FAST)


def test_header_layout_is_what_the_docstring_says(sealed: bytes) -> None:
    magic, version, kdf, log2_n, r, p = struct.unpack_from(">8sBBBBB", sealed)
    assert (magic, version, kdf, log2_n, r, p) == (MAGIC, 1, 1, FAST.log2_n, FAST.r, FAST.p)
    assert HEADER_SIZE == 8 + 5 + 16 + 12


def _with_secret(value: bytes) -> Bundle:
    secret = TpmSecret(uuid="0c6a4b7e-54a4-4bb5-a0d2-6e3b3f1e2d11", value=SecretBytes(value))
    return dataclasses.replace(_bundle(), tpm_secret=secret)


def test_the_tpm_secret_travels_sealed_in_a_version_2_bundle() -> None:
    value = os.urandom(43)
    original = _with_secret(value)

    data = write_bundle(original, PASSPHRASE, FAST)

    assert struct.unpack_from(">8sB", data)[1] == 2
    assert not any(form in data for form in leak_forms(value))
    read = read_bundle(data, PASSPHRASE)
    assert read.tpm_secret == original.tpm_secret
    assert [entry.blob for entry in read.entries] == [entry.blob for entry in original.entries]


def test_a_wrong_passphrase_reveals_nothing_of_the_tpm_secret() -> None:
    value = os.urandom(43)
    data = write_bundle(_with_secret(value), PASSPHRASE, FAST)
    with pytest.raises(BundleAuthenticationError) as refused:
        read_bundle(data, "not the passphrase")
    assert not any(form in str(refused.value).encode() for form in leak_forms(value))


def test_a_version_that_does_not_match_the_secret_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A version-2 header over a manifest without a secret (or the reverse) is not a file
    this module writes."""
    with monkeypatch.context() as patch:
        patch.setattr(bundle_module, "FORMAT_VERSION", 2)
        data = write_bundle(_bundle(), PASSPHRASE, FAST)
        with pytest.raises(BundleContentError, match="does not match whether it holds"):
            read_bundle(data, PASSPHRASE)
