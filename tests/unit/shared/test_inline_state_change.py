"""A change's inline blob is the version the change announces: kind, hash, size and token
equal, or the change does not validate."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from keeper_shared.messages.state import StateChange
from keeper_shared.messages.types import FencingToken, StateKind
from keeper_shared.sealing.state_blobs import seal_state_blob
from keeper_shared.state_format.blobs import seal_blob
from support.sealing_keys import new_keys

VM_ID = "00000000-0000-4000-8000-000000000001"


def _change(**overrides: Any) -> StateChange:
    blob = seal_blob(StateKind.TPM, b"tpm state", FencingToken(epoch=2, generation=7))
    fields: dict[str, Any] = {
        "vm_id": VM_ID,
        "kind": blob.kind,
        "content_hash": blob.content_hash,
        "size": blob.size,
        "token": blob.token,
        "sealed": seal_state_blob(VM_ID, blob, new_keys().public),
    }
    return StateChange(**{**fields, **overrides})


def test_a_change_with_its_own_blob_inline_is_valid() -> None:
    change = _change()
    assert change.sealed is not None
    assert change.sealed.content_hash == change.content_hash


@pytest.mark.parametrize(
    "overrides",
    [
        {"kind": StateKind.NVRAM},
        {"content_hash": "cd" * 32},
        {"size": 1},
        {"token": FencingToken(epoch=2, generation=8)},
        {"token": FencingToken(epoch=3, generation=7)},
    ],
)
def test_an_inline_blob_of_another_version_is_refused(overrides: dict[str, Any]) -> None:
    with pytest.raises(ValidationError, match="inline blob"):
        _change(**overrides)


def test_a_change_without_inline_state_is_valid_as_before() -> None:
    assert _change(sealed=None).sealed is None
