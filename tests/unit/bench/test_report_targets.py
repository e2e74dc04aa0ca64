"""docs/benchmarks.md's verdicts (`bench.report`) from figures made by hand: each target is
judged on the median of its same-run ratios, a missing figure is never "met", and every
figure lands in the table with its target beside it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, cast

from bench.report import write_report
from bench.runner import Settings
from bench.stats import Figure

if TYPE_CHECKING:
    from bench.profile import Summary
    from bench.runner import Bench


@dataclass
class FakeBench:
    figures: dict[str, Figure] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    profiles: dict[str, Summary] = field(default_factory=dict)

    def add(self, key: str, name: str, rounds: list[float], target: str = "") -> None:
        self.figures[key] = Figure(name, "ratio", list(rounds), target=target)


def report(tmp_path: Path, bench: FakeBench) -> str:
    return write_report(
        tmp_path / "benchmarks.md", cast("Bench", bench), {"cpus": "2"}, Settings(), 60.0
    )


def line_with(text: str, needle: str) -> str:
    (line,) = [line for line in text.splitlines() if line.startswith("- ") and needle in line]
    return line


def test_each_target_is_judged_on_the_median_of_its_rounds(tmp_path: Path) -> None:
    bench = FakeBench()
    bench.add("cpu_ratio_tpm", "CPU ratio", [2.5, 3.5, 2.9], target="≤ 3")
    bench.add("lat_hop_ratio", "Latency ratio", [3.0, 5.0, 4.5], target="≤ 4")
    bench.add("fanin_ratio_10", "Fan-in: 10 hosts / 1 host", [0.96, 0.97, 0.9], target="≥ 0.95")
    bench.add("fanin_ratio_1000", "Fan-in: 1,000 hosts / 1 host", [0.91, 0.5, 0.92], "≥ 0.9")
    bench.add("restore_p99", "Restore p99", [13.5])
    bench.pooled_latency = [1.0, 2.0]  # type: ignore[attr-defined]

    text = report(tmp_path, bench)

    assert "2.90 — met" in line_with(text, "Cost per version")
    assert "4.50 — NOT met" in line_with(text, "Latency:")
    assert "0.960 — met" in line_with(text, "Fan-in: 10 hosts")
    assert "0.910 — met" in line_with(text, "Fan-in: 1,000 hosts")
    assert "13.5 ms — met (target < 20 ms)" in line_with(text, "Restore p99")
    assert "| CPU ratio | ratio | 2.50 | 2.90 | 3.50 | 3 | ≤ 3 |" in text
    assert (tmp_path / "benchmarks.md").read_text(encoding="utf-8") == text


def test_a_figure_that_was_not_measured_is_never_met(tmp_path: Path) -> None:
    text = report(tmp_path, FakeBench())

    assert "n/a — NOT met" in line_with(text, "Cost per version")
    assert "NOT met" in line_with(text, "Idle host agent")


def test_the_boot_storm_line_carries_its_goals(tmp_path: Path) -> None:
    bench = FakeBench()
    bench.add("storm_all", "Boot storm: every newest state stored", [42.0])
    bench.add("storm_vs_steady", "storm / steady", [0.95], target="≥ 0.9")
    bench.add("storm_slowest", "slowest / median", [2.5], target="≤ 2")
    bench.add("storm_hosts", "host spread", [1.1])

    line = line_with(report(tmp_path, bench), "Boot storm: every newest state stored:")

    assert "42.0 s" in line
    assert "steady = 0.950 — met" in line
    assert "median = 2.50 — NOT met" in line


def test_the_floor_line_says_what_the_target_leaves_and_what_is_spent(tmp_path: Path) -> None:
    bench = FakeBench()
    bench.add("cpu_ratio_tpm", "CPU ratio", [5.0], target="≤ 3")
    bench.add("cpu_raw_tpm", "Raw CPU", [1.0])
    bench.add("cpu_floor_ratio", "Floor", [2.25])
    bench.add("cpu_beyond_floor", "Beyond", [2.5])
    bench.add("cpu_essential", "Essential", [0.5])

    line = line_with(report(tmp_path, bench), "The floor under that ratio")

    assert "alone are 2.25 raw messages" in line
    assert "leaves 0.75 ms" in line
    assert "they spend 2.50 ms, of which 0.50 ms" in line


def test_the_fan_in_bound_says_whether_one_ack_per_event_leaves_the_target_in_reach(
    tmp_path: Path,
) -> None:
    bench = FakeBench()
    for key, value in (
        ("fanin_busy_1", 86.0),
        ("fanin_busy_1000", 85.0),
        ("fanin_all_cpu_ratio_1000", 0.54),
        ("floor_consume_1", 0.12),
        ("floor_consume_64", 0.07),
        ("fanin_ceiling_64", 0.925),
    ):
        bench.add(key, key, [value])
    bench.add("fanin_ceiling_1", "ceiling", [0.88])

    line = line_with(report(tmp_path, bench), "What bounds the fan-in at 1,000 hosts")

    assert "at most 0.880 (0.925 with batched acknowledgements): 0.9 is out of reach" in line
    assert "= 0.540, times 85.0 / 86.0: 0.534" in line

    bench.add("fanin_ceiling_1", "ceiling", [0.91])
    assert "0.9 is within reach" in line_with(report(tmp_path, bench), "What bounds the fan-in")


def test_each_fan_in_ratio_is_set_beside_its_cpu_bound_and_event_sizes(tmp_path: Path) -> None:
    bench = FakeBench()
    bench.add("fanin_ratio_100", "Fan-in: 100 hosts / 1 host", [0.8], target="≥ 0.95")
    bench.add("fanin_ratio_10", "Fan-in: 10 hosts / 1 host", [0.96], target="≥ 0.95")
    bench.add("fanin_all_cpu_ratio_100", "bound", [0.78])
    bench.add("fanin_per_event_1", "per event", [120.0])
    bench.add("fanin_per_event_100", "per event", [2.5])

    text = report(tmp_path, bench)

    assert line_with(text, "Fan-in: 100 hosts").endswith(
        "; every process's CPU per version, 1 host / 100 hosts: 0.780, "
        "versions per state.changed event 120 at 1 host and 2.50 at 100"
    )
    # Without its own bound measured, a ratio is shown alone.
    assert line_with(text, "Fan-in: 10 hosts").endswith("per-round ratios)")
