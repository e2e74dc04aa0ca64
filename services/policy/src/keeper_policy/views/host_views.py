"""Hosts as :class:`HostView`, with policy's liveness rule applied: alive while heartbeats
arrive, silent once the last one is older than ``host_lost_after_s``, lost once declared
(the liveness checker declares a silent host lost on its next round)."""

from __future__ import annotations

from datetime import UTC, datetime

from keeper_policy.hosts.registry import HostRecord
from keeper_shared.messages.queries import HostView, Liveness


def liveness(record: HostRecord, now: float, lost_after_s: float) -> Liveness:
    """Where ``record`` stands at ``now``."""
    if record.lost_at is not None:
        return Liveness.LOST
    if record.alive(now, lost_after_s):
        return Liveness.ALIVE
    return Liveness.SILENT


def host_view(record: HostRecord, now: float, lost_after_s: float) -> HostView:
    """The view of one host at ``now``."""
    return HostView(
        host=record.host,
        liveness=liveness(record, now, lost_after_s),
        last_seen=datetime.fromtimestamp(record.last_seen, UTC),
        lost_at=None if record.lost_at is None else datetime.fromtimestamp(record.lost_at, UTC),
        cluster=record.cluster,
        capabilities=record.capabilities,
        vms=len(record.inventory),
        heartbeat_interval_s=record.interval_s,
    )
