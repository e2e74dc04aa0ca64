"""Sampling profiles of the real services with py-spy, summarised by function."""

from __future__ import annotations

import asyncio
import shutil
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path


def py_spy() -> str | None:
    """The py-spy binary next to this interpreter, or on PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


async def record(pid: int, out: Path, duration_s: int) -> bool:
    """Sample ``pid`` for ``duration_s`` into a collapsed-stack file; False if py-spy failed."""
    binary = py_spy()
    if binary is None:
        return False
    process = await asyncio.create_subprocess_exec(
        binary,
        "record",
        "--pid",
        str(pid),
        "--duration",
        str(duration_s),
        "--rate",
        "200",
        "--nonblocking",
        "--format",
        "raw",
        "--output",
        str(out),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    return await process.wait() == 0 and out.exists()


@dataclass(frozen=True)
class Summary:
    """Where the samples were: by leaf function (self) and by any frame (inclusive)."""

    samples: int
    """Samples of a thread doing work."""
    all_samples: int
    """Every sample, idle threads included."""
    self_top: list[tuple[str, float]]
    inclusive_top: list[tuple[str, float]]


def _frame_name(frame: str) -> str:
    # py-spy raw frames read "function (path/to/module.py:line)".
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    path = where.rsplit(":", 1)[0]
    parts = Path(path).parts
    if "site-packages" in parts:
        parts = parts[parts.index("site-packages") + 1 :]
    elif "src" in parts:
        parts = parts[len(parts) - 1 - parts[::-1].index("src") + 1 :]
    else:
        parts = parts[-2:]
    return f"{name} ({'/'.join(parts)})"


_PLUMBING = (
    "asyncio/",
    "threading.py",
    "runpy",
    "futures/thread.py",
    "__main__.py",
    "service_runner.py",
)
_IDLE_LEAVES = ("EpollSelector.select", "_worker (futures/thread.py)")
"""A thread waiting: the event loop in epoll, a pool worker waiting for work."""
"""Frames every sample passes through (event loop, thread and module runners)."""


def summarise(collapsed: Path, top: int = 12) -> Summary:
    """Read py-spy's collapsed stacks (``frame;frame;... count`` per line)."""
    self_counts: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    every = 0
    for line in collapsed.read_text(encoding="utf-8", errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        every += count
        frames = [_frame_name(frame) for frame in stack.split(";") if "(" in frame]
        if not frames or frames[-1].startswith(_IDLE_LEAVES):
            continue
        total += count
        self_counts[frames[-1]] += count
        for name in set(frames):
            if not any(marker in name for marker in _PLUMBING):
                inclusive[name] += count
    if total == 0:
        return Summary(0, every, [], [])

    def share(counter: Counter[str]) -> list[tuple[str, float]]:
        return [(name, 100.0 * count / total) for name, count in counter.most_common(top)]

    return Summary(total, every, share(self_counts), share(inclusive))
