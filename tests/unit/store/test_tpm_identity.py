"""Reading a TPM's identity out of its permall, without I/O: libtpms' layouts (state
format 3, before libtpms 0.10, and 4, with a profile) inside swtpm's framings (header
version 1, version 2 records, encrypted as swtpm does with a libvirt secret), and every
way a permall can fail to be one. The real thing is held against swtpm in
tests/integration/store/test_tpm_reset.py."""

from __future__ import annotations

import hashlib
import hmac
import os
import struct

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from keeper_shared.libtpms import NULL_STATE_PROFILE, StateProfile
from keeper_shared.state_format.tpm_archive import MAIN_STATE_FILE_NAME, pack_tpm_state
from keeper_state_store.identity.fingerprint import (
    archive_identity,
    permall_identity,
    seed_fingerprint,
)
from keeper_state_store.identity.permall import (
    PermallEncryptedError,
    PermallFormatError,
    endorsement_seed,
    read_swtpm_blob,
)
from keeper_state_store.identity.profile import state_profile
from keeper_state_store.identity.swtpm_encryption import state_key
from keeper_state_store.storage.repository import WriteOutcome, WriteResult
from keeper_state_store.storage.tpm_trust import TrustVerdict


def _tpm2b(data: bytes) -> bytes:
    return struct.pack(">H", len(data)) + data


DEFAULT_V1 = b'{"ActiveProfile":{"Name":"default-v1","StateFormatLevel":7,"Commands":"0x11f"}}'


def _libtpms_state(seed: bytes, *, version: int = 4, profile_json: bytes = DEFAULT_V1) -> bytes:
    """A PERSISTENT_ALL laid out as libtpms marshals it, up to the seeds (the rest is
    opaque here), with its closing magic."""
    header = struct.pack(">HIH", version, 0xAB364723, version)
    profile = _tpm2b(profile_json + b"\x00") if version >= 4 else b""
    constants = struct.pack(">HIHI", 3, 0xC9EA6431, 1, 3) + struct.pack(">3I", 1, 2, 3)
    constants += b"\x01" + _tpm2b(b"\x00\x07")  # a skippable block with 2 bytes in it
    data = struct.pack(">HIH", 5, 0x12213443, 5) + b"\x00" + struct.pack(">3H", 0x0B, 0x0B, 0x0B)
    data += _tpm2b(os.urandom(32)) + _tpm2b(b"") + _tpm2b(b"") + _tpm2b(b"") * 3
    data += _tpm2b(seed) + _tpm2b(os.urandom(64)) + _tpm2b(os.urandom(64))
    return header + profile + constants + data + os.urandom(200) + struct.pack(">I", 0xAB364723)


def _framed(state: bytes, *, header_version: int = 2, flags: int = 0) -> bytes:
    body = state if header_version == 1 else struct.pack(">HI", 1, len(state)) + state
    return struct.pack(">BBHHI", header_version, 1, 10, flags, 10 + len(body)) + body


def _encrypted(state: bytes, passphrase: bytes) -> bytes:
    """``state`` encrypted as swtpm 0.7 writes it with ``--key pwdfd=N,mode=aes-256-cbc``."""
    key = state_key(passphrase, long_key=True)
    iv = os.urandom(32)
    pad = 16 - len(state) % 16
    encryptor = Cipher(algorithms.AES(key), modes.CBC(iv[:16])).encryptor()
    ciphertext = encryptor.update(state + bytes([pad]) * pad) + encryptor.finalize()
    tag = hmac.new(key, ciphertext + iv, hashlib.sha256).digest()
    records = b"".join(
        struct.pack(">HI", t, len(d)) + d for t, d in ((2, ciphertext), (3, tag), (6, iv))
    )
    return struct.pack(">BBHHI", 2, 1, 10, 0x01 | 0x08, 10 + len(records)) + records


SEED = os.urandom(64)


@pytest.mark.parametrize("libtpms_version", [3, 4])
@pytest.mark.parametrize("header_version", [1, 2])
def test_the_endorsement_seed_is_read_from_every_layout(
    libtpms_version: int, header_version: int
) -> None:
    permall = _framed(_libtpms_state(SEED, version=libtpms_version), header_version=header_version)
    assert endorsement_seed(read_swtpm_blob(permall).records[1]) == SEED
    assert permall_identity(permall).fingerprint == seed_fingerprint(SEED)


def test_the_fingerprint_follows_the_seed_and_nothing_else() -> None:
    first = permall_identity(_framed(_libtpms_state(SEED))).fingerprint
    rewritten = permall_identity(_framed(_libtpms_state(SEED, version=3))).fingerprint
    other = permall_identity(_framed(_libtpms_state(os.urandom(64)))).fingerprint
    assert first == rewritten
    assert first != other
    assert first is not None
    assert SEED.hex() not in first


def test_an_encrypted_permall_opens_only_with_its_secret() -> None:
    permall = _encrypted(_libtpms_state(SEED), b"the-secret")
    assert read_swtpm_blob(permall).encrypted
    without = permall_identity(permall)
    assert without.fingerprint is None
    assert without.needs_secret
    assert permall_identity(permall, b"the-secret").fingerprint == seed_fingerprint(SEED)
    wrong = permall_identity(permall, b"another-secret")
    assert wrong.fingerprint is None
    assert "does not open" in (wrong.unknown_because or "")


_GOOD = _framed(_libtpms_state(SEED))


@pytest.mark.parametrize(
    "damaged",
    [
        _GOOD[:-1],  # swtpm's total length no longer matches
        _GOOD[:9],  # shorter than swtpm's header
        bytes([3]) + _GOOD[1:],  # a header version swtpm 0.7 does not write
        _framed(_libtpms_state(SEED)[:40]),  # framed right, the libtpms state cut short
        _framed(b"\x00" * 64),  # framed right, not libtpms' state
    ],
)
def test_a_damaged_permall_has_no_identity(damaged: bytes) -> None:
    assert permall_identity(damaged).fingerprint is None


def test_every_overrun_of_the_libtpms_state_is_a_format_error() -> None:
    state = _libtpms_state(SEED)
    seed_end = state.index(SEED) + len(SEED)
    for cut in range(0, seed_end, 7):
        with pytest.raises(PermallFormatError):
            endorsement_seed(state[:cut])
    with pytest.raises(PermallFormatError, match="magic"):
        endorsement_seed(struct.pack(">HI", 4, 0x12345678) + state[6:])
    with pytest.raises(PermallFormatError, match="all zeros"):
        endorsement_seed(_libtpms_state(bytes(32)))


def test_an_encrypted_blob_is_not_read_as_plain() -> None:
    from keeper_state_store.identity.permall import plain_state

    blob = read_swtpm_blob(_encrypted(_libtpms_state(SEED), b"x"))
    with pytest.raises(PermallEncryptedError):
        plain_state(blob)


def test_an_archive_is_read_through_its_permall_and_anything_else_is_unknown() -> None:
    permall = _framed(_libtpms_state(SEED))
    archive = pack_tpm_state({MAIN_STATE_FILE_NAME: permall})
    assert archive_identity(archive).fingerprint == seed_fingerprint(SEED)
    assert archive_identity(b"no archive").fingerprint is None
    random_permall = pack_tpm_state({MAIN_STATE_FILE_NAME: os.urandom(300)})
    assert archive_identity(random_permall).fingerprint is None


def test_the_fenced_writes_reply_carries_the_identity_verdict() -> None:
    judged = WriteResult.from_reply([b"stored", b"7", b"reset", b"6", b"7"])
    assert judged.outcome is WriteOutcome.STORED
    assert judged.trust is not None
    assert (judged.trust.verdict, judged.trust.restore_version) == (TrustVerdict.RESET, 6)
    assert judged.trust.reset_version == 7
    assert WriteResult.from_reply([b"stored", b"3", b"", b"", b""]).trust is None
    assert WriteResult.from_reply([b"stale", b"3"]) == WriteResult(WriteOutcome.STALE, "3")


def test_a_state_libtpms_0_9_wrote_is_the_null_profile_at_level_1() -> None:
    state = _libtpms_state(SEED, version=3)
    assert state_profile(state) == NULL_STATE_PROFILE == StateProfile("null", 1)
    assert permall_identity(_framed(state)).profile == NULL_STATE_PROFILE


def test_the_profile_and_level_libtpms_0_10_wrote_are_read_from_the_state() -> None:
    permall = _framed(_libtpms_state(SEED))
    assert permall_identity(permall).profile == StateProfile("default-v1", 7)


def test_a_profile_without_a_level_is_level_1_as_libtpms_reads_it() -> None:
    state = _libtpms_state(SEED, profile_json=b'{"ActiveProfile":{"Name":"null"}}')
    assert state_profile(state) == StateProfile("null", 1)


@pytest.mark.parametrize(
    "profile_json",
    [
        b"not json",
        b'{"Name":"default-v1"}',
        b'{"ActiveProfile":{"StateFormatLevel":7}}',
        b'{"ActiveProfile":{"Name":"","StateFormatLevel":7}}',
        b'{"ActiveProfile":{"Name":"custom","StateFormatLevel":0}}',
        b'{"ActiveProfile":{"Name":"custom","StateFormatLevel":"7"}}',
        b'{"ActiveProfile":{"Name":"custom","StateFormatLevel":true}}',
    ],
)
def test_a_profile_that_is_not_libtpms_json_is_unknown_and_the_identity_stands(
    profile_json: bytes,
) -> None:
    state = _libtpms_state(SEED, profile_json=profile_json)
    with pytest.raises(PermallFormatError):
        state_profile(state)
    identity = permall_identity(_framed(state))
    assert identity.fingerprint == seed_fingerprint(SEED)
    assert identity.profile is None


def test_an_encrypted_state_gives_its_profile_only_with_its_secret() -> None:
    permall = _encrypted(_libtpms_state(SEED), b"the libvirt secret")
    assert permall_identity(permall).profile is None
    assert permall_identity(permall, b"the libvirt secret").profile == StateProfile("default-v1", 7)
