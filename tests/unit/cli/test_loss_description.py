"""What `keeper vm delete-state` and `disable-tpm` say is lost, before asking."""

from __future__ import annotations

from datetime import UTC, datetime

from keeper_shared.keeper_client.loss import describe_loss
from keeper_shared.messages.snapshot import SnapshotInfo
from keeper_shared.messages.state import (
    KindHistory,
    StateHistory,
    StateVersionInfo,
    VersionOrigin,
)
from keeper_shared.messages.types import FencingToken, StateKind

VM_ID = "6f1c1e9e-3f7a-4d47-9a57-2b8f3c0f6a11"
NOW = datetime(2026, 11, 28, tzinfo=UTC)


def version(number: int) -> StateVersionInfo:
    return StateVersionInfo(
        version=number,
        content_hash="0" * 64,
        size=10,
        token=FencingToken(epoch=1, generation=number),
        host="host-a",
        origin=VersionOrigin.HOST,
        stored_at=NOW,
        in_history=True,
    )


def history(tpm: list[int], nvram: list[int]) -> StateHistory:
    return StateHistory(
        vm_id=VM_ID,
        kinds=[
            KindHistory(
                kind=kind,
                head_version=numbers[-1] if numbers else None,
                versions=[version(n) for n in numbers],
            )
            for kind, numbers in ((StateKind.TPM, tpm), (StateKind.NVRAM, nvram))
        ],
    )


def test_nothing_stored_loses_nothing() -> None:
    assert describe_loss(history([], []), []) == []


def test_every_kind_snapshots_and_the_consequence_are_named() -> None:
    snapshots = [
        SnapshotInfo(snapshot_id=name, created_at=NOW, versions={StateKind.TPM: 3})
        for name in ("a", "b")
    ]
    lines = describe_loss(history([3, 7, 8], [5]), snapshots)
    assert lines[:3] == [
        "TPM: 3 stored versions (v3..v8), newest v8",
        "NVRAM: 1 stored version (v5), newest v5",
        "snapshots: 2 (a, b)",
    ]
    assert "BitLocker" in lines[3]
