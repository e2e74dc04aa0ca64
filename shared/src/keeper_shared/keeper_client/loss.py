"""What deleting a VM's state loses, said plainly before anyone confirms it."""

from __future__ import annotations

from keeper_shared.messages.snapshot import SnapshotInfo
from keeper_shared.messages.state import StateHistory


def describe_loss(history: StateHistory, snapshots: list[SnapshotInfo]) -> list[str]:
    """One line per thing that is lost: each kind's kept versions, the snapshots, and what
    that means for the guest. Empty when nothing is stored."""
    lines = []
    for kind in history.kinds:
        if not kind.versions:
            continue
        numbers = [item.version for item in kind.versions]
        span = f"v{numbers[0]}" if len(numbers) == 1 else f"v{numbers[0]}..v{numbers[-1]}"
        plural = "s" if len(numbers) > 1 else ""
        lines.append(
            f"{kind.kind.value.upper()}: {len(numbers)} stored version{plural} ({span}), "
            f"newest v{kind.head_version}"
        )
    if snapshots:
        names = ", ".join(item.snapshot_id for item in snapshots)
        lines.append(f"snapshots: {len(snapshots)} ({names})")
    if lines:
        lines.append(
            "the guest loses every key sealed in its TPM (BitLocker and LUKS then need their "
            "recovery keys) and its UEFI variables (boot entries, Secure Boot keys)"
        )
    return lines
