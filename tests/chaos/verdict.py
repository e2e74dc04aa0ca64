"""Invariant checks a chaos run ends with, beyond the history checks of `analyse`.

- `acknowledged_lost`: every version announced by ``state.persisted`` is still in Redis
  with the same content and token (invariant 1).
- `recovery_points`: for every host-agent kill, each of that host's VMs' content current at
  the kill that had been stable longer than the recovery-point bound must have been stored
  before the agent came back (only the agent can hand the store a blob, so anything stored
  while it was dead was fetched before it died); and how much change a host that never
  came back would have cost (the recovery point: from the first change not stored to the
  kill), the worst of which the table reports.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from chaos.faults import FaultKind, InjectedFault
from chaos.harness import ChaosCluster, Seen, StateLoad, StoredVersion
from keeper_shared.messages.state import StatePersisted
from keeper_shared.messages.types import StateKind

STALE_MARKERS = ("older over newer", "is not newer", "newer token than the head")
"""How `analyse` words a write that put older state over newer."""
DOUBLE_APPLY_MARKERS = ("repeats", "twice")
"""How `analyse` words a write applied twice."""


async def acknowledged_lost(
    cluster: ChaosCluster, acknowledged: Sequence[Seen[StatePersisted]]
) -> list[str]:
    """Announced versions that Redis no longer holds as announced."""
    lost = []
    cache: dict[tuple[str, StateKind], dict[int, StoredVersion]] = {}
    for seen in acknowledged:
        event = seen.data
        key = (event.vm_id, event.kind)
        if key not in cache:
            cache[key] = await cluster.stored_versions(event.vm_id, event.kind)
        kept = cache[key].get(event.version)
        if kept is None or kept.content_hash != event.content_hash or kept.token != event.token:
            lost.append(f"{event.kind.value} v{event.version} of {event.vm_id[:8]}")
    return lost


@dataclass
class RecoveryPoints:
    """The host-kill checks and figures."""

    checked: int = 0
    """(kill, VM, kind) cases whose content was older than the bound at the kill."""
    violations: list[str] = field(default_factory=list)
    worst_s: float = 0.0


async def recovery_points(
    cluster: ChaosCluster,
    loads: Sequence[StateLoad],
    faults: Sequence[InjectedFault],
    bound_s: float,
) -> RecoveryPoints:
    """Check and measure every host kill (see the module docstring)."""
    result = RecoveryPoints()
    kills = [fault for fault in faults if fault.kind is FaultKind.HOST_KILL]
    for load in loads:
        for vm in load.vms:
            for kind in StateKind:
                writes = load.writes.get((vm.vm_id, kind), [])
                stored = await cluster.stored_versions(vm.vm_id, kind)
                for kill in kills:
                    if kill.target != vm.host.host_id:
                        continue
                    before = [write for write in writes if write.at <= kill.at]
                    if not before:
                        continue
                    saved = {
                        version.content_hash
                        for version in stored.values()
                        if version.stored_at < kill.back_at
                    }
                    newest_saved = max(
                        (i for i, write in enumerate(before) if write.content_hash in saved),
                        default=-1,
                    )
                    if newest_saved < len(before) - 1:
                        first_unsaved = before[newest_saved + 1]
                        result.worst_s = max(result.worst_s, kill.at - first_unsaved.at)
                    current = before[-1]
                    if kill.at - current.at > bound_s:
                        result.checked += 1
                        if current.content_hash not in saved:
                            result.violations.append(
                                f"{kind.value} of {vm.vm_id[:8]} on {kill.target}: stable "
                                f"{kill.at - current.at:.1f} s before the kill, not stored"
                            )
    return result


def classify(problems: Sequence[str]) -> tuple[list[str], list[str], list[str]]:
    """Split `analyse` problems into stale overwrites, double applies and the rest."""
    stale = [p for p in problems if any(marker in p for marker in STALE_MARKERS)]
    double = [p for p in problems if p not in stale and any(m in p for m in DOUBLE_APPLY_MARKERS)]
    other = [p for p in problems if p not in stale and p not in double]
    return stale, double, other
