"""The key ring: current KEK wraps, every KEK held unwraps what it wrapped, chosen by id."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from keeper_state_store.crypto.encryption import (
    DecryptionError,
    KeyEncryptionKey,
    KeyFileError,
    WrappedKey,
    generate_key_file,
    new_data_key,
    wrap_data_key,
)
from keeper_state_store.crypto.key_ring import KeyRing, UnknownKeyError


def _kek() -> KeyEncryptionKey:
    return KeyEncryptionKey(os.urandom(32))


def test_wrap_uses_the_current_key_and_unwrap_round_trips() -> None:
    current, old = _kek(), _kek()
    ring = KeyRing(current, [old])
    dek = new_data_key()

    wrapped = ring.wrap(dek)

    assert wrapped.kek_id == current.key_id
    assert ring.is_current(wrapped)
    assert ring.unwrap(wrapped) == dek
    assert ring.key_ids == (current.key_id, old.key_id)


def test_unwrap_picks_the_key_named_by_the_record() -> None:
    first, second, third = _kek(), _kek(), _kek()
    ring = KeyRing(third, [first, second])
    for kek in (first, second, third):
        dek = new_data_key()
        assert ring.unwrap(wrap_data_key(kek, dek)) == dek


def test_unknown_key_is_refused_by_id_without_key_bytes() -> None:
    held, stranger = _kek(), _kek()
    ring = KeyRing(held)
    with pytest.raises(UnknownKeyError) as caught:
        ring.unwrap(wrap_data_key(stranger, new_data_key()))
    text = str(caught.value)
    assert stranger.key_id in text
    assert held.key_id in text
    for secret in (held.material, stranger.material):
        assert secret.hex() not in text
    assert isinstance(caught.value, DecryptionError)
    assert not ring.knows(stranger.key_id)
    assert ring.knows(held.key_id)


def test_tampered_record_fails_its_integrity_check() -> None:
    kek = _kek()
    ring = KeyRing(kek)
    wrapped = ring.wrap(new_data_key())
    broken = WrappedKey(kek_id=wrapped.kek_id, wrapped=bytes(40))
    with pytest.raises(DecryptionError) as caught:
        ring.unwrap(broken)
    assert not isinstance(caught.value, UnknownKeyError)


def test_rewrap_moves_an_old_record_to_the_current_key_and_keeps_the_data_key() -> None:
    old, new = _kek(), _kek()
    dek = new_data_key()
    wrapped_old = wrap_data_key(old, dek)
    ring = KeyRing(new, [old])

    rewrapped = ring.rewrap(wrapped_old)

    assert rewrapped.kek_id == new.key_id
    assert KeyRing(new).unwrap(rewrapped) == dek
    # Deterministic (AES key wrap): two replicas compute the same bytes; current stays put.
    assert ring.rewrap(wrapped_old) == rewrapped
    assert ring.rewrap(rewrapped) is rewrapped


def test_duplicates_are_dropped_and_repr_shows_ids_only() -> None:
    current = _kek()
    same = KeyEncryptionKey(current.material)
    ring = KeyRing(current, [same, current])
    assert ring.key_ids == (current.key_id,)
    text = repr(ring)
    assert current.key_id in text
    assert current.material.hex() not in text


def test_from_files_loads_current_and_previous(tmp_path: Path) -> None:
    current = generate_key_file(tmp_path / "current.key")
    old = generate_key_file(tmp_path / "old.key")

    ring = KeyRing.from_files(tmp_path / "current.key", [tmp_path / "old.key"])

    assert ring.current == current
    assert ring.key_ids == (current.key_id, old.key_id)


def test_from_files_refuses_an_unsafe_previous_key_file(tmp_path: Path) -> None:
    generate_key_file(tmp_path / "current.key")
    loose = tmp_path / "old.key"
    loose.write_text(os.urandom(32).hex())
    loose.chmod(0o644)
    with pytest.raises(KeyFileError, match="chmod 600"):
        KeyRing.from_files(tmp_path / "current.key", [loose])
