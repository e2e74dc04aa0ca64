"""The chaos run: every fault under load, every invariant checked, one table.

The CI variant (part of ``make test``) injects at least 5 host-agent kills, 5 store-replica
kills, 2 broker restarts and 2 Redis restarts, plus policy kills, host cut-offs and lost
Redis replies; ``make chaos`` runs the long variant (``KEEPER_CHAOS_PROFILE=long``). The
table is printed (visible with ``-s``) and is in the failure message.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from chaos.backend import LocalBackend
from chaos.scenario import CI_PROFILE, LONG_PROFILE, run_chaos

PROFILE = LONG_PROFILE if os.environ.get("KEEPER_CHAOS_PROFILE") == "long" else CI_PROFILE
TIMEOUT_S = 3600 if PROFILE is LONG_PROFILE else 900
"""Against hangs only; the CI run takes about a minute and a half on a quiet machine."""

pytestmark = [pytest.mark.chaos, pytest.mark.rabbit, pytest.mark.redis, pytest.mark.libvirt]


@pytest.mark.timeout(TIMEOUT_S)
async def test_every_fault_under_load_keeps_every_invariant(
    local_chaos_backend: LocalBackend, tmp_path: Path
) -> None:
    report = await run_chaos(local_chaos_backend, PROFILE, tmp_path / "chaos")
    table = report.table()
    print()
    print(table)
    failures = report.failures()
    assert not failures, "\n".join([table, *report.fault_log, *failures])
    assert all(report.faults[kind] >= count for kind, count in PROFILE.faults.items()), (
        report.faults
    )
    assert report.recovery_points_checked > 0, "no host kill met a change older than the bound"
