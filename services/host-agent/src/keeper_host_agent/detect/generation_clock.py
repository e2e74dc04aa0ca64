"""Generations that only grow, also across agent restarts and a clock stepped back.

A generation is wall-clock microseconds, bumped by one whenever the clock would repeat or
step back, so within one run it always grows. Across a restart it would not: an agent that
comes back after the clock was set back (NTP correction, a wrong RTC) would hand out
generations below the ones the store holds, and the store would refuse every new write of
its VMs as stale until the clock caught up. So the agent keeps a high-water mark on disk:
before handing out a generation it has reserved one beyond it, ten minutes of microseconds
ahead, and a restarted agent starts above the last reservation. One small atomic write per
ten minutes of generations.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Final

RESERVE_US: Final = 600_000_000
"""How far ahead of the generation handed out the mark on disk is moved (10 min)."""


class GenerationMarkError(RuntimeError):
    """The high-water mark file cannot be read or written: generations could go back."""


def read_mark(path: Path) -> int:
    """The mark the previous run reserved; 0 when there was none."""
    try:
        text = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        return 0
    except (OSError, UnicodeDecodeError) as error:
        raise GenerationMarkError(f"cannot read the generation mark {path}: {error}") from None
    if not text.isdigit():
        raise GenerationMarkError(
            f"the generation mark {path} holds no number: remove it only if no generation "
            "was ever handed out from a clock ahead of the current one"
        )
    return int(text)


def write_mark(path: Path, mark: int) -> None:
    """Replace the mark atomically (temp file, fsync, rename, fsync of the directory)."""
    temp = path.with_name(f".{path.name}.tmp")
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, f"{mark}\n".encode("ascii"))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, path)
        directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
    except OSError as error:
        raise GenerationMarkError(f"cannot write the generation mark {path}: {error}") from None


class GenerationClock:
    """Hands out strictly growing generations; with ``mark_file``, across restarts too."""

    def __init__(self, mark_file: Path | None = None) -> None:
        self._mark_file = mark_file
        self._reserved = read_mark(mark_file) if mark_file is not None else 0
        # Everything the previous run handed out is below its reservation.
        self._last = self._reserved

    def next(self) -> int:
        """A generation strictly greater than every one handed out before."""
        candidate = max(self._last + 1, time.time_ns() // 1000)
        if self._mark_file is not None and candidate >= self._reserved:
            # Reserve before handing out: a crash after this never reuses what followed.
            write_mark(self._mark_file, candidate + RESERVE_US)
            self._reserved = candidate + RESERVE_US
        self._last = candidate
        return candidate
