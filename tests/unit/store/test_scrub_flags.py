"""The scrubber's per-version record: round trip, tolerant of growth, refuses garbage."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from keeper_shared.messages.types import StateKind
from keeper_shared.redis_access.keys import scrub_lock_key, state_flags_key
from keeper_state_store.scrub.flags import ScrubFlag

VM = "5b0e8d1e-3c55-4d8f-9a51-0c6f6f8e2a11"


def test_round_trip() -> None:
    flag = ScrubFlag(
        scrubbed_at=datetime(2024, 5, 1, 12, 0, tzinfo=UTC),
        ok=True,
        reason="endorsement key changed since version 2",
        content_hash="ab" * 32,
        ek_sha256="cd" * 32,
        swtpm_loaded=True,
        ek_changed=True,
        previous_good_version=2,
    )
    assert ScrubFlag.from_json(flag.to_json()) == flag
    assert ScrubFlag.from_json(flag.to_json().encode()) == flag


def test_missing_optional_fields_take_defaults_and_unknown_ones_are_ignored() -> None:
    raw = json.dumps({"scrubbed_at": "2024-05-01T12:00:00+00:00", "ok": False, "new": 1})
    flag = ScrubFlag.from_json(raw)
    assert flag is not None
    assert not flag.ok
    assert (flag.reason, flag.ek_sha256, flag.ek_changed) == (None, None, False)


@pytest.mark.parametrize(
    "raw",
    [
        b"not json",
        b"[]",
        b"{}",
        json.dumps({"scrubbed_at": "yesterday", "ok": True}).encode(),
        json.dumps({"scrubbed_at": "2024-05-01T12:00:00+00:00", "ok": True, "reason": 5}),
    ],
)
def test_garbage_is_none(raw: bytes | str) -> None:
    assert ScrubFlag.from_json(raw) is None


def test_keys_share_the_vm_hash_tag() -> None:
    assert state_flags_key(VM, StateKind.TPM) == f"keeper:{{{VM}}}:tpm:flags"
    assert state_flags_key(VM, StateKind.NVRAM) == f"keeper:{{{VM}}}:nvram:flags"
    assert scrub_lock_key(VM) == f"keeper:{{{VM}}}:scrub-lock"
