"""Sealing on the bus without I/O: the construction, its binding, keys and their files.

A sealed payload opens only with the receiver's private key and only under the binding it
was sealed with; every altered byte or moved field fails with `SealingError`, whose text
never quotes the payload.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import replace
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
)
from pydantic import SecretBytes, ValidationError

from keeper_shared.messages.envelope import decode, encode, new_envelope
from keeper_shared.messages.sealed import SealedBlob, SealedStateBlob
from keeper_shared.messages.state import SealedVmState, StateFetched
from keeper_shared.messages.types import FencingToken, StateKind, TpmSecret
from keeper_shared.sealing import keygen
from keeper_shared.sealing.construction import SealBinding, SealedPayload, SealingError
from keeper_shared.sealing.construction import open_sealed as open_payload
from keeper_shared.sealing.construction import seal as seal_payload
from keeper_shared.sealing.keys import (
    SealingKeyFileError,
    SealingPrivateKeys,
    SealingPublicKey,
    create_private_key_file,
    key_id_of,
    load_or_create_private_key,
    load_private_key,
)
from keeper_shared.sealing.state_blobs import (
    open_state_blob,
    open_tpm_secret,
    seal_state_blob,
    seal_tpm_secret,
)
from keeper_shared.state_format.blobs import open_blob, seal_blob
from support.leak_scan import content_fingerprints, leak_forms
from support.sealing_keys import new_keys

VM_ID = "6b2f7e0a-3c1d-4d6e-9a8b-1c2d3e4f5a6b"
OTHER_VM = "0c6a4b7e-54a4-4bb5-a0d2-6e3b3f1e2d11"
SECRET_UUID = "5d1f0b8e-7a0c-4c55-9d0e-2b7f8f6c1a22"
CONTENT = b"PERMALL-" + os.urandom(3000) + b"\x00" * 2000
TOKEN = FencingToken(epoch=4, generation=17)
BINDING = SealBinding(VM_ID, "tpm", "4.17", "ab" * 32)


def _forms(text: bytes | str, secret: bytes) -> bool:
    data = text.encode() if isinstance(text, str) else text
    return any(form in data for form in leak_forms(secret))


# --- the construction ----------------------------------------------------------------------


def test_a_payload_opens_with_the_receivers_key_and_binding_only() -> None:
    receiver, stranger = new_keys(), new_keys()
    sealed = seal_payload(CONTENT, receiver.public, BINDING)

    assert open_payload(sealed, receiver, BINDING) == CONTENT
    assert sealed.key_id == receiver.public.key_id
    assert CONTENT[:64] not in sealed.ciphertext
    with pytest.raises(SealingError, match=f"sealed for key {receiver.public.key_id}"):
        open_payload(sealed, stranger, BINDING)


@pytest.mark.parametrize(
    "moved",
    [
        replace(BINDING, vm_id=OTHER_VM),
        replace(BINDING, kind="nvram"),
        replace(BINDING, token="4.18"),
        replace(BINDING, content_hash="cd" * 32),
    ],
    ids=["vm", "kind", "token", "hash"],
)
def test_a_payload_bound_elsewhere_does_not_open(moved: SealBinding) -> None:
    keys = new_keys()
    sealed = seal_payload(CONTENT, keys.public, BINDING)

    with pytest.raises(SealingError, match="does not open") as refused:
        open_payload(sealed, keys, moved)
    assert not _forms(str(refused.value), CONTENT[:32])


def test_the_receivers_key_id_is_bound_too() -> None:
    """A payload relabelled with another key id the receiver holds (after a rotation) does
    not open under that key either: the id is in the associated data."""
    old = X25519PrivateKey.generate()
    keys = SealingPrivateKeys(X25519PrivateKey.generate(), [old])
    sealed = seal_payload(CONTENT, keys.public, BINDING)
    relabelled = replace(sealed, key_id=key_id_of(old.public_key()))

    with pytest.raises(SealingError):
        open_payload(relabelled, keys, BINDING)


@pytest.mark.parametrize("field", ["ciphertext", "nonce", "ephemeral_public_key"])
def test_any_altered_byte_is_refused(field: str) -> None:
    keys = new_keys()
    sealed = seal_payload(CONTENT, keys.public, BINDING)
    parts = {
        "ephemeral_public_key": sealed.ephemeral_public_key,
        "nonce": sealed.nonce,
        "ciphertext": sealed.ciphertext,
    }
    parts[field] = bytes([parts[field][0] ^ 0x01]) + parts[field][1:]
    altered = SealedPayload(sealed.key_id, **parts)

    with pytest.raises(SealingError):
        open_payload(altered, keys, BINDING)


def test_a_malformed_or_low_order_ephemeral_key_is_refused() -> None:
    keys = new_keys()
    sealed = seal_payload(CONTENT, keys.public, BINDING)

    with pytest.raises(SealingError, match="malformed"):
        open_payload(replace(sealed, nonce=b"short"), keys, BINDING)
    with pytest.raises(SealingError, match="ephemeral"):
        open_payload(replace(sealed, ephemeral_public_key=bytes(32)), keys, BINDING)


def test_every_seal_is_fresh() -> None:
    """A new ephemeral key and nonce each time: equal payloads never look alike."""
    keys = new_keys()
    first, second = (seal_payload(CONTENT, keys.public, BINDING) for _ in range(2))

    assert first.ephemeral_public_key != second.ephemeral_public_key
    assert first.nonce != second.nonce
    assert first.ciphertext != second.ciphertext


def test_the_associated_data_is_canonical_and_names_everything_bound() -> None:
    document = json.loads(BINDING.associated_data("0123456789abcdef"))

    assert document == {
        "construction": "vtpm-keeper-seal-v1",
        "vm_id": VM_ID,
        "kind": "tpm",
        "token": "4.17",
        "content_hash": "ab" * 32,
        "key_id": "0123456789abcdef",
    }
    assert BINDING.associated_data("k") != replace(BINDING, kind="tpm,").associated_data("k")


# --- state blobs and TPM secrets ---------------------------------------------------------


def test_a_state_blob_round_trips_sealed_on_the_wire() -> None:
    keys = new_keys()
    blob = seal_blob(StateKind.TPM, CONTENT, TOKEN)
    sealed = seal_state_blob(VM_ID, blob, keys.public)
    reply = StateFetched(vms=[SealedVmState(vm_id=VM_ID, blobs=[sealed])])
    wire = encode(new_envelope(reply, source="host-agent/hv01", subject=VM_ID))

    assert [form for form in content_fingerprints(CONTENT) if form in wire] == []
    (received,) = decode(wire, StateFetched).data.vms[0].blobs
    assert open_blob(open_state_blob(VM_ID, received, keys)) == CONTENT


def test_a_state_blob_is_bound_to_its_vm_token_hash_and_command_epoch() -> None:
    keys = new_keys()
    blob = seal_blob(StateKind.NVRAM, CONTENT, TOKEN)
    sealed = seal_state_blob(VM_ID, blob, keys.public, command_epoch=5)

    assert open_state_blob(VM_ID, sealed, keys, command_epoch=5).content_hash == blob.content_hash
    newer = FencingToken(epoch=4, generation=18)
    for wrong_vm, wrong_blob, epoch in [
        (OTHER_VM, sealed, 5),
        (VM_ID, sealed, 6),  # replayed into another start
        (VM_ID, sealed, None),
        (VM_ID, sealed.model_copy(update={"token": newer}), 5),
        (VM_ID, sealed.model_copy(update={"content_hash": "ef" * 32}), 5),
        (VM_ID, sealed.model_copy(update={"kind": StateKind.TPM}), 5),
    ]:
        with pytest.raises(SealingError):
            open_state_blob(wrong_vm, wrong_blob, keys, command_epoch=epoch)


def test_a_tpm_secret_is_sealed_to_its_vm_and_uuid() -> None:
    keys = new_keys()
    value = b"swtpm-passphrase-" + os.urandom(16).hex().encode()
    secret = TpmSecret(uuid=SECRET_UUID, value=SecretBytes(value))
    sealed = seal_tpm_secret(VM_ID, secret, keys.public, command_epoch=2)

    assert not _forms(sealed.model_dump_json(), value)
    assert open_tpm_secret(VM_ID, sealed, keys, command_epoch=2) == secret
    with pytest.raises(SealingError):
        open_tpm_secret(OTHER_VM, sealed, keys, command_epoch=2)
    with pytest.raises(SealingError):
        open_tpm_secret(VM_ID, sealed.model_copy(update={"uuid": VM_ID}), keys, command_epoch=2)


def test_the_sealed_model_refuses_malformed_fields() -> None:
    good = seal_state_blob(VM_ID, seal_blob(StateKind.TPM, CONTENT, TOKEN), new_keys().public)
    document = json.loads(good.model_dump_json())
    for field, bad in [("key_id", "ZZ"), ("nonce", "AAAA"), ("ephemeral_public_key", "AAAA")]:
        broken = {**document, "sealed": {**document["sealed"], field: bad}}
        with pytest.raises(ValidationError, match=field):
            SealedStateBlob.model_validate(broken)
    with pytest.raises(ValidationError, match="ciphertext"):
        SealedBlob.model_validate({**document["sealed"], "ciphertext": "!!"})


# --- keys, rotation, files ---------------------------------------------------------------


def test_a_key_id_is_derived_from_the_public_key() -> None:
    keys = new_keys()
    again = SealingPublicKey.from_text(keys.public.to_text())

    assert again.key_id == keys.public.key_id
    assert len(keys.public.key_id) == 16
    assert new_keys().public.key_id != keys.public.key_id
    assert repr(keys) == f"SealingPrivateKeys(key_ids=({keys.public.key_id!r},))"
    for bad in ("not base64!", "QUFB"):
        with pytest.raises(ValueError, match="sealing public key"):
            SealingPublicKey.from_text(bad)


def test_after_a_rotation_the_previous_key_still_opens_what_was_in_flight() -> None:
    old_key = X25519PrivateKey.generate()
    old = SealingPrivateKeys(old_key)
    in_flight = seal_payload(CONTENT, old.public, BINDING)
    rotated = SealingPrivateKeys(X25519PrivateKey.generate(), [old_key])

    assert rotated.public.key_id != old.public.key_id
    assert rotated.key_ids == (rotated.public.key_id, old.public.key_id)
    assert open_payload(in_flight, rotated, BINDING) == CONTENT
    dropped = SealingPrivateKeys(X25519PrivateKey.generate())
    with pytest.raises(SealingError, match="does not hold"):
        open_payload(in_flight, dropped, BINDING)


def test_a_key_file_is_made_0600_once_and_read_back(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "sealing.key"
    made = create_private_key_file(path)

    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert key_id_of(load_private_key(path).public_key()) == key_id_of(made.public_key())
    assert list(path.parent.iterdir()) == [path]  # no temporary file left behind
    with pytest.raises(SealingKeyFileError, match="already exists"):
        create_private_key_file(path)
    first = load_or_create_private_key(tmp_path / "host.key")
    assert key_id_of(load_or_create_private_key(tmp_path / "host.key").public_key()) == key_id_of(
        first.public_key()
    )


def test_an_unsafe_or_foreign_key_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "sealing.key"
    create_private_key_file(path)
    path.chmod(0o640)
    with pytest.raises(SealingKeyFileError, match="chmod 600"):
        load_private_key(path)

    other = tmp_path / "ed25519.key"
    other.write_bytes(
        Ed25519PrivateKey.generate().private_bytes(
            Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()
        )
    )
    other.chmod(0o600)
    with pytest.raises(SealingKeyFileError, match="not an X25519 key"):
        load_private_key(other)

    garbage = tmp_path / "garbage.key"
    garbage.write_bytes(os.urandom(64))
    garbage.chmod(0o600)
    with pytest.raises(SealingKeyFileError, match="not a PEM private key"):
        load_private_key(garbage)
    with pytest.raises(SealingKeyFileError, match="cannot open"):
        load_private_key(tmp_path / "missing.key")
    with pytest.raises(SealingKeyFileError, match="not a regular file"):
        load_private_key(tmp_path)


def test_keygen_makes_a_key_and_prints_only_its_public_half(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "store-sealing.key"

    assert keygen.main([str(path)]) == 0
    made = capsys.readouterr().out
    assert keygen.main(["--public", str(path)]) == 0
    public = SealingPublicKey(load_private_key(path).public_key())
    assert capsys.readouterr().out == f"{public.to_text()}\n"
    assert f"public key: {public.to_text()}" in made
    assert f"key id:     {public.key_id}" in made
    assert "PRIVATE" not in made
    assert keygen.main([str(path)]) == 1
    assert "already exists" in capsys.readouterr().err
    assert keygen.main([]) == 2
