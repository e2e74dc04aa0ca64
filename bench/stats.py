"""Small statistics helpers and the result table."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field


def percentile(samples: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile (``fraction`` in 0..1) of a non-empty sample."""
    ordered = sorted(samples)
    if not ordered:
        raise ValueError("no samples")
    rank = max(0, min(len(ordered) - 1, round(fraction * len(ordered) + 0.5) - 1))
    return ordered[rank]


@dataclass
class Figure:
    """One measured figure over several rounds."""

    name: str
    unit: str
    rounds: list[float] = field(default_factory=list)
    target: str = ""
    note: str = ""

    def add(self, value: float) -> None:
        """Record one round's value."""
        self.rounds.append(value)

    @property
    def median(self) -> float:
        """Median over the rounds (nan when none)."""
        return statistics.median(self.rounds) if self.rounds else float("nan")

    def cells(self) -> tuple[str, str, str]:
        """min, median, max as text."""
        if not self.rounds:
            return ("n/a", "n/a", "n/a")
        return (fmt(min(self.rounds)), fmt(self.median), fmt(max(self.rounds)))


def fmt(value: float) -> str:
    """A figure with a sensible number of digits."""
    if value != value:  # nan
        return "n/a"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    if abs(value) >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def table(figures: Sequence[Figure]) -> str:
    """A Markdown table: figure, unit, min, median, max, rounds, target."""
    lines = [
        "| Figure | Unit | Min | Median | Max | Rounds | Target |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for figure in figures:
        low, mid, high = figure.cells()
        lines.append(
            f"| {figure.name} | {figure.unit} | {low} | {mid} | {high} | "
            f"{len(figure.rounds)} | {figure.target} |"
        )
    return "\n".join(lines)
