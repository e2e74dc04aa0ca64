"""Generations only grow: within a run, and across a restart after the clock was set back
(with the high-water mark on disk)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from keeper_host_agent.detect import generation_clock
from keeper_host_agent.detect.generation_clock import (
    RESERVE_US,
    GenerationClock,
    GenerationMarkError,
)

NOW_US = 1_800_000_000_000_000


class FakeTime:
    """The wall clock, in microseconds, set by the test."""

    def __init__(self, now_us: int) -> None:
        self.now_us = now_us

    def time_ns(self) -> int:
        return self.now_us * 1000


@pytest.fixture
def clock_time(monkeypatch: pytest.MonkeyPatch) -> FakeTime:
    fake = FakeTime(NOW_US)
    monkeypatch.setattr(time, "time_ns", fake.time_ns)
    return fake


def test_within_a_run_generations_grow_even_when_the_clock_steps_back(
    clock_time: FakeTime,
) -> None:
    clock = GenerationClock()
    first = clock.next()
    clock_time.now_us -= 3_600_000_000
    assert clock.next() == first + 1


def test_without_a_mark_a_restart_after_the_clock_stepped_back_goes_backwards(
    clock_time: FakeTime,
) -> None:
    """What the mark is for: the store would refuse these as stale."""
    before = GenerationClock().next()
    clock_time.now_us -= 3_600_000_000
    assert GenerationClock().next() < before


def test_with_a_mark_a_restart_after_the_clock_stepped_back_keeps_growing(
    clock_time: FakeTime, tmp_path: Path
) -> None:
    mark = tmp_path / "state" / "generation"
    run = GenerationClock(mark)
    handed_out = [run.next() for _ in range(3)]
    clock_time.now_us += RESERVE_US * 3  # the clock ran far ahead, then was set back
    handed_out.append(run.next())

    clock_time.now_us = NOW_US - 3_600_000_000
    restarted = GenerationClock(mark)
    assert restarted.next() > max(handed_out)


def test_the_mark_is_written_once_per_reservation_not_per_generation(
    clock_time: FakeTime, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    writes: list[int] = []
    real_write = generation_clock.write_mark

    def counting(path: Path, mark: int) -> None:
        writes.append(mark)
        real_write(path, mark)

    monkeypatch.setattr(generation_clock, "write_mark", counting)
    clock = GenerationClock(tmp_path / "generation")
    for _ in range(100):
        clock_time.now_us += 1000
        clock.next()
    assert len(writes) == 1
    clock_time.now_us += RESERVE_US
    clock.next()
    assert len(writes) == 2


def test_a_mark_that_is_not_a_number_stops_the_agent(tmp_path: Path) -> None:
    mark = tmp_path / "generation"
    mark.write_text("garbage\n")
    with pytest.raises(GenerationMarkError, match="holds no number"):
        GenerationClock(mark)
