"""The boot storm's arithmetic (`bench.storm.summarise`) on hand-made writes and events.

What the report relies on: a VM is done when a version at least as new as its last write
of each kind was stored (an intermediate write superseded before its pull is never stored
and must not hold it back); a VM still missing its newest state is unfinished, not fast;
the recovery point of a write is the wait for a version at least as new; events of other
scenarios are not counted.
"""

from __future__ import annotations

import math

import pytest

from bench.storm import Write, summarise
from keeper_shared.messages.types import StateKind

TPM, NVRAM = StateKind.TPM, StateKind.NVRAM


def write(at: float, vm: str, kind: StateKind, generation: int, host: str = "h1") -> Write:
    return Write(at, vm, host, kind, f"{vm}-{kind.value}-{generation}", generation)


def stored(at: float, vm: str, kind: StateKind, generation: int) -> tuple[float, str, str]:
    return (at, vm, f"{vm}-{kind.value}-{generation}")


def test_a_vm_is_done_when_its_newest_state_of_each_kind_is_stored() -> None:
    writes = [
        write(0.0, "a", TPM, 1),
        write(0.1, "a", NVRAM, 2),
        write(0.2, "a", TPM, 3),  # supersedes 1 before it was pulled
        write(0.0, "b", TPM, 4, host="h2"),
    ]
    events = [
        stored(0.5, "a", NVRAM, 2),
        stored(0.9, "a", TPM, 3),
        stored(0.4, "b", TPM, 4),
        (0.3, "other-vm", "some-hash"),  # another scenario's version
    ]

    summary = summarise(writes, events, started=0.0)

    assert summary.vms == 2
    assert summary.hosts == 2
    assert summary.unfinished == 0
    assert summary.versions_stored == 3
    assert summary.all_stored_s == pytest.approx(0.9)
    assert summary.slowest_vm_s == pytest.approx(0.9)
    assert summary.median_vm_s == pytest.approx((0.9 + 0.4) / 2)
    assert summary.host_median_spread == pytest.approx(0.9 / 0.4)
    assert summary.slowest_host_median_s == pytest.approx(0.9)
    # Exposure: TPM 1 covered by 3 at 0.9 (0.9 s), NVRAM 2 at 0.5 (0.4 s), TPM 3 at 0.9
    # (0.7 s), b's TPM at 0.4 (0.4 s).
    assert summary.exposure_max_s == pytest.approx(0.9)
    assert summary.exposure_p50_s == pytest.approx(0.4)
    assert summary.stored_per_s == pytest.approx(3 / 0.9)


def test_an_older_version_stored_after_the_newest_write_does_not_finish_the_vm() -> None:
    writes = [write(0.0, "a", TPM, 1), write(0.2, "a", TPM, 2), write(0.0, "b", TPM, 3)]
    events = [stored(0.5, "a", TPM, 1), stored(0.3, "b", TPM, 3)]

    summary = summarise(writes, events, started=0.0)

    assert summary.unfinished == 1
    assert math.isnan(summary.all_stored_s)  # never reached, not "as fast as b"
    assert summary.slowest_vm_s == pytest.approx(0.3)  # among the finished: b
    assert summary.stored_per_s == pytest.approx(2 / 0.5)


def test_nothing_stored_leaves_every_figure_undefined_not_zero() -> None:
    summary = summarise([write(0.0, "a", TPM, 1)], [], started=0.0)

    assert summary.unfinished == 1
    assert math.isnan(summary.all_stored_s)
    assert math.isnan(summary.exposure_p99_s)


def test_no_writes_is_an_error() -> None:
    with pytest.raises(ValueError, match="no writes"):
        summarise([], [], started=0.0)
