"""Encryption at rest: envelope keys, sealed blobs and key files (invariant 4 included)."""

from __future__ import annotations

import base64
import os
import secrets
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from keeper_state_store.crypto.encryption import (
    DataKey,
    DecryptionError,
    KeyEncryptionKey,
    KeyFileError,
    WrappedKey,
    blob_associated_data,
    decrypt_blob,
    encrypt_blob,
    generate_key_file,
    load_key_encryption_key,
    new_data_key,
    rewrap_data_key,
    unwrap_data_key,
    wrap_data_key,
)

VM_A = "5b0e8d1e-3c55-4d8f-9a51-0c6f6f8e2a11"
VM_B = "a7f3c2d4-1b2e-4e5f-8a9b-3c4d5e6f7a8b"
HASH = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"


def secret_forms(secret: bytes) -> list[str]:
    """Every textual form a leaked secret could take."""
    return [
        secret.hex(),
        secret.hex().upper(),
        base64.b64encode(secret).decode(),
        base64.urlsafe_b64encode(secret).decode(),
        repr(secret)[2:-1],
        secret.decode("latin-1"),
    ]


def assert_no_secret(text: str, *secrets_: bytes) -> None:
    for secret in secrets_:
        for form in secret_forms(secret):
            assert form not in text


def write_key_file(path: Path, content: bytes, mode: int = 0o600) -> Path:
    path.write_bytes(content)
    path.chmod(mode)
    return path


def aad(vm_id: str = VM_A, kind: str = "tpm", epoch: int = 3, generation: int = 7) -> bytes:
    return blob_associated_data(vm_id, kind, epoch, generation, HASH)


def test_blob_round_trip() -> None:
    dek = new_data_key()
    plaintext = secrets.token_bytes(4096)

    sealed = encrypt_blob(dek, plaintext, aad())

    assert decrypt_blob(dek, sealed, aad()) == plaintext
    assert sealed[0] == 1
    assert len(sealed) == 1 + 12 + len(plaintext) + 16


def test_same_plaintext_seals_differently_each_time() -> None:
    dek = new_data_key()
    assert encrypt_blob(dek, b"state", aad()) != encrypt_blob(dek, b"state", aad())


@pytest.mark.parametrize(
    "other_aad",
    [
        pytest.param(aad(vm_id=VM_B), id="other-vm"),
        pytest.param(aad(kind="nvram"), id="other-kind"),
        pytest.param(aad(epoch=4), id="other-epoch"),
        pytest.param(aad(generation=6), id="older-generation"),
        pytest.param(blob_associated_data(VM_A, "tpm", 3, 7, "0" * 64), id="other-hash"),
    ],
)
def test_ciphertext_bound_to_its_vm_kind_and_version(other_aad: bytes) -> None:
    dek = new_data_key()
    sealed = encrypt_blob(dek, b"tpm state", aad())

    with pytest.raises(DecryptionError):
        decrypt_blob(dek, sealed, other_aad)


def test_associated_data_fields_cannot_run_into_each_other() -> None:
    # Without length prefixes ("ab", "c") and ("a", "bc") would encode alike.
    first = blob_associated_data("vm-a", "tpm", 1, 2, "hash")
    second = blob_associated_data("vm-", "tpm", 1, 2, "ahash")
    assert first != second


@pytest.mark.parametrize(
    ("kind", "epoch", "generation"),
    [("disk", 0, 0), ("tpm", -1, 0), ("tpm", 0, 2**64)],
)
def test_associated_data_rejects_bad_fields(kind: str, epoch: int, generation: int) -> None:
    with pytest.raises(ValueError, match=r"kind|epoch|generation"):
        blob_associated_data(VM_A, kind, epoch, generation, HASH)


@pytest.mark.parametrize("position", [0, 5, 20, -1])
def test_tampered_byte_fails(position: int) -> None:
    dek = new_data_key()
    sealed = bytearray(encrypt_blob(dek, b"x" * 64, aad()))
    sealed[position] ^= 0x01

    with pytest.raises(DecryptionError):
        decrypt_blob(dek, bytes(sealed), aad())


@pytest.mark.parametrize("length", [0, 1, 13, 28])
def test_truncated_blob_fails(length: int) -> None:
    dek = new_data_key()
    sealed = encrypt_blob(dek, b"", aad())

    with pytest.raises(DecryptionError):
        decrypt_blob(dek, sealed[:length], aad())


def test_wrong_data_key_fails() -> None:
    sealed = encrypt_blob(new_data_key(), b"tpm state", aad())

    with pytest.raises(DecryptionError):
        decrypt_blob(new_data_key(), sealed, aad())


def test_wrap_unwrap_round_trip_through_storage_format() -> None:
    kek = KeyEncryptionKey(secrets.token_bytes(32))
    dek = new_data_key()

    stored = wrap_data_key(kek, dek).to_bytes()
    restored = WrappedKey.from_bytes(stored)

    assert restored.kek_id == kek.key_id
    assert unwrap_data_key(kek, restored) == dek


def test_unwrap_with_wrong_kek_fails() -> None:
    kek, other = (
        KeyEncryptionKey(secrets.token_bytes(32)),
        KeyEncryptionKey(secrets.token_bytes(32)),
    )
    wrapped = wrap_data_key(kek, new_data_key())

    with pytest.raises(DecryptionError, match=other.key_id):
        unwrap_data_key(other, wrapped)


def test_unwrap_with_wrong_kek_fails_even_if_the_id_is_forged() -> None:
    kek, other = (
        KeyEncryptionKey(secrets.token_bytes(32)),
        KeyEncryptionKey(secrets.token_bytes(32)),
    )
    wrapped = wrap_data_key(kek, new_data_key())
    forged = WrappedKey(kek_id=other.key_id, wrapped=wrapped.wrapped)

    with pytest.raises(DecryptionError):
        unwrap_data_key(other, forged)


@pytest.mark.parametrize(
    "record",
    [
        b"",
        b"\x01abcdef01" + b"\x00" * 39,
        b"\x02abcdef01" + b"\x00" * 40,
        b"\x01ABCDEF01" + b"\x00" * 40,
    ],
    ids=["empty", "short", "version", "id"],
)
def test_malformed_wrapped_key_record_fails(record: bytes) -> None:
    with pytest.raises(DecryptionError):
        WrappedKey.from_bytes(record)


def test_rotation_rewrap_keeps_the_data_key_and_its_blobs() -> None:
    old_kek, new_kek = (
        KeyEncryptionKey(secrets.token_bytes(32)),
        KeyEncryptionKey(secrets.token_bytes(32)),
    )
    dek = new_data_key()
    sealed = encrypt_blob(dek, b"nvram", aad(kind="nvram"))
    wrapped = wrap_data_key(old_kek, dek)

    rewrapped = rewrap_data_key(old_kek, new_kek, wrapped)

    assert rewrapped.kek_id == new_kek.key_id
    assert unwrap_data_key(new_kek, rewrapped) == dek
    assert decrypt_blob(unwrap_data_key(new_kek, rewrapped), sealed, aad(kind="nvram")) == b"nvram"
    with pytest.raises(DecryptionError):
        unwrap_data_key(old_kek, rewrapped)


@pytest.mark.parametrize(
    "encode",
    [
        pytest.param(lambda k: k, id="raw"),
        pytest.param(lambda k: k.hex().encode() + b"\n", id="hex"),
        pytest.param(lambda k: b"  " + k.hex().upper().encode() + b"\r\n", id="HEX"),
        pytest.param(lambda k: base64.b64encode(k) + b"\n", id="base64"),
    ],
)
def test_load_key_file_formats(tmp_path: Path, encode: Callable[[bytes], bytes]) -> None:
    material = secrets.token_bytes(32)
    while all(32 <= c < 127 for c in material):  # pragma: no cover - ~1e-14
        material = secrets.token_bytes(32)
    path = write_key_file(tmp_path / "kek", encode(material))

    kek = load_key_encryption_key(path)

    assert kek == KeyEncryptionKey(material)
    assert len(kek.key_id) == 8


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o601])
def test_key_file_open_to_others_is_refused(tmp_path: Path, mode: int) -> None:
    material = secrets.token_bytes(32)
    path = write_key_file(tmp_path / "kek", material.hex().encode(), mode)

    with pytest.raises(KeyFileError) as caught:
        load_key_encryption_key(path)

    message = str(caught.value)
    assert str(path) in message
    assert f"{mode:04o}" in message
    assert_no_secret(message, material)


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(b"", id="empty"),
        pytest.param(secrets.token_bytes(31), id="raw-31"),
        pytest.param(secrets.token_bytes(33), id="raw-33"),
        pytest.param(secrets.token_bytes(31).hex().encode(), id="hex-31"),
        pytest.param(base64.b64encode(secrets.token_bytes(16)), id="base64-16"),
        pytest.param(b"correct horse battery staple!!!!", id="text-32"),
        pytest.param(b"not a key at all, just words\n" * 3, id="text"),
        pytest.param(b"0" * 5000, id="huge"),
    ],
)
def test_key_file_with_wrong_content_is_refused(tmp_path: Path, content: bytes) -> None:
    path = write_key_file(tmp_path / "kek", content)

    with pytest.raises(KeyFileError) as caught:
        load_key_encryption_key(path)

    message = str(caught.value)
    assert str(path) in message
    if len(content) >= 8:
        assert_no_secret(message, content)
    assert caught.value.__cause__ is None
    assert caught.value.__suppress_context__ or caught.value.__context__ is None


def test_missing_key_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="cannot open key file"):
        load_key_encryption_key(tmp_path / "absent")


def test_key_file_directory_is_refused(tmp_path: Path) -> None:
    directory = tmp_path / "dir"
    directory.mkdir(mode=0o700)

    with pytest.raises(KeyFileError, match="not a regular file"):
        load_key_encryption_key(directory)


def test_generate_key_file_is_private_and_loadable(tmp_path: Path) -> None:
    path = tmp_path / "kek"
    old_umask = os.umask(0)
    try:
        generated = generate_key_file(path)
    finally:
        os.umask(old_umask)

    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_key_encryption_key(path) == generated
    assert [p.name for p in tmp_path.iterdir()] == ["kek"]


def test_generate_key_file_refuses_to_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "kek"
    generate_key_file(path)
    before = path.read_bytes()

    with pytest.raises(KeyFileError, match="already exists"):
        generate_key_file(path)

    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["kek"]


def test_reprs_and_errors_never_show_keys_or_plaintext(tmp_path: Path) -> None:
    kek_material = secrets.token_bytes(32)
    kek = KeyEncryptionKey(kek_material)
    dek = new_data_key()
    plaintext = secrets.token_bytes(64)
    sealed = encrypt_blob(dek, plaintext, aad())
    wrapped = wrap_data_key(kek, dek)
    texts = [repr(kek), str(kek), repr(dek), str(dek), f"{dek}", repr(wrapped)]

    failures: list[BaseException] = []
    for attempt in (
        lambda: decrypt_blob(dek, sealed[:-1] + bytes([sealed[-1] ^ 1]), aad()),
        lambda: decrypt_blob(new_data_key(), sealed, aad()),
        lambda: decrypt_blob(dek, sealed, aad(vm_id=VM_B)),
        lambda: decrypt_blob(dek, sealed[:10], aad()),
        lambda: unwrap_data_key(KeyEncryptionKey(secrets.token_bytes(32)), wrapped),
        lambda: unwrap_data_key(
            KeyEncryptionKey(secrets.token_bytes(32)),
            WrappedKey(kek_id=kek.key_id, wrapped=wrapped.wrapped[:-1] + b"\x00"),
        ),
    ):
        with pytest.raises(DecryptionError) as caught:
            attempt()
        failures.append(caught.value)
    for failure in failures:
        texts.extend([str(failure), repr(failure)])
        assert failure.__cause__ is None
        assert failure.__suppress_context__ or failure.__context__ is None

    for text in texts:
        assert_no_secret(text, kek_material, dek.material, plaintext, wrapped.wrapped)


def test_keys_validate_their_length() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        DataKey(b"short")
    with pytest.raises(ValueError, match="32 bytes"):
        KeyEncryptionKey(b"short")
