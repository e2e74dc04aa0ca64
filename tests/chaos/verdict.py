"""Invariant checks a chaos run ends with, beyond the history checks of `analyse`.

- `acknowledged_lost`: every version announced by ``state.persisted`` is still in Redis
  with the same content and token (invariant 1).
- `recovery_points`: for every host-agent kill, each of that host's VMs' content current at
  the kill that had been stable longer than the recovery-point bound must have been stored
  before the agent came back (only the agent can hand the store a blob, so anything stored
  while it was dead was fetched before it died); and how much change a host that never
  came back would have cost (the recovery point: from the first change not stored to the
  kill), the worst of which the table reports. Stable counts from when the store could
  write again: nothing is stored while the broker or Redis is down (or, with replicas, while
  no replica can acknowledge a write), nor while the killed host itself was cut off from the
  broker, so the bound starts again once that fault recovered.
  The table also reports the worst recovery point counted the same way (from the later of
  the first change not stored and that recovery): what the store's own catching up cost,
  apart from the time no store could write at all.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from chaos.faults import FaultKind, InjectedFault
from chaos.harness import ChaosCluster, StateLoad, StoredVersion, Write
from keeper_shared.messages.state import StatePersisted
from keeper_shared.messages.types import StateKind
from support.events import Seen

STALE_MARKERS = ("older over newer", "is not newer", "newer token than the head")
"""How `analyse` words a write that put older state over newer."""
DOUBLE_APPLY_MARKERS = ("repeats", "twice")
"""How `analyse` words a write applied twice."""
STORAGE_OUTAGES = frozenset({FaultKind.BROKER_RESTART, FaultKind.REDIS_RESTART})
"""Faults during which no store replica can store anything."""


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
    worst_since_writable_s: float = 0.0
    """The worst recovery point counted from when the store could last write again."""


@dataclass(frozen=True)
class AtKill:
    """One VM's state of one kind at one host-agent kill."""

    stable_s: float
    """How long the content current at the kill had been in place."""
    saved: bool
    """Whether that content was stored before the agent came back."""
    recovery_point_s: float
    """From the first change not stored to the kill (0 when every change was stored): what
    a host that never came back would have cost."""
    since_writable_s: float = 0.0
    """The same, counted from when the store could last write again if that was later."""


def at_kill(
    writes: Sequence[Write],
    stored: Iterable[StoredVersion],
    killed_at: float,
    back_at: float,
    writable_since: float = 0.0,
) -> AtKill | None:
    """Judge one VM state at one kill; None when nothing had been written yet. Stable time
    counts from the last write or from ``writable_since`` (when the store could last write
    again after an outage), whichever is later."""
    before = [write for write in writes if write.at <= killed_at]
    if not before:
        return None
    # Only the agent hands the store a blob: what was stored before it came back had been
    # fetched before it died.
    saved = {version.content_hash for version in stored if version.stored_at < back_at}
    newest_saved = max(
        (i for i, write in enumerate(before) if write.content_hash in saved), default=-1
    )
    unsaved = before[newest_saved + 1 :]
    return AtKill(
        stable_s=killed_at - max(before[-1].at, writable_since),
        saved=not unsaved,
        recovery_point_s=killed_at - unsaved[0].at if unsaved else 0.0,
        since_writable_s=killed_at - max(unsaved[0].at, writable_since) if unsaved else 0.0,
    )


def store_writable_since(kill: InjectedFault, faults: Sequence[InjectedFault]) -> float:
    """When the store could last take the killed host's state again before ``kill`` (0: no
    outage before it): after a broker or Redis outage, or after that host's own cut-off
    from the broker healed (while cut off it cannot hand the store anything)."""
    return max(
        (
            fault.recovered_at
            for fault in faults
            if (
                fault.kind in STORAGE_OUTAGES
                or (fault.kind is FaultKind.HOST_CUT and fault.target == kill.target)
            )
            and fault.recovered_at <= kill.at
        ),
        default=0.0,
    )


async def recovery_points(
    cluster: ChaosCluster,
    loads: Sequence[StateLoad],
    faults: Sequence[InjectedFault],
    bound_s: float,
) -> RecoveryPoints:
    """Check and measure every host kill (see the module docstring)."""
    result = RecoveryPoints()
    kills = [fault for fault in faults if fault.kind is FaultKind.HOST_KILL]
    writable_since = {kill: store_writable_since(kill, faults) for kill in kills}
    for load in loads:
        for vm in load.vms:
            for kind in StateKind:
                writes = load.writes.get((vm.vm_id, kind), [])
                stored = (await cluster.stored_versions(vm.vm_id, kind)).values()
                for kill in kills:
                    if kill.target != vm.host.host_id:
                        continue
                    judged = at_kill(writes, stored, kill.at, kill.back_at, writable_since[kill])
                    if judged is None:
                        continue
                    result.worst_s = max(result.worst_s, judged.recovery_point_s)
                    result.worst_since_writable_s = max(
                        result.worst_since_writable_s, judged.since_writable_s
                    )
                    if judged.stable_s > bound_s:
                        result.checked += 1
                        if not judged.saved:
                            result.violations.append(
                                f"{kind.value} of {vm.vm_id[:8]} on {kill.target}: stable "
                                f"{judged.stable_s:.1f} s before the kill, not stored"
                            )
    return result


def classify(problems: Sequence[str]) -> tuple[list[str], list[str], list[str]]:
    """Split `analyse` problems into stale overwrites, double applies and the rest."""
    stale = [p for p in problems if any(marker in p for marker in STALE_MARKERS)]
    double = [p for p in problems if p not in stale and any(m in p for m in DOUBLE_APPLY_MARKERS)]
    other = [p for p in problems if p not in stale and p not in double]
    return stale, double, other
