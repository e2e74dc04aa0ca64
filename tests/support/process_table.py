"""Finding this test process's own children in /proc."""

from __future__ import annotations

import os
from pathlib import Path


def swtpm_children() -> list[int]:
    """Pids of swtpm processes (zombies included) whose parent is this test process."""
    me = os.getpid()
    found: list[int] = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue  # gone meanwhile
        # "pid (comm) state ppid ...": comm may hold spaces, so split after the ")".
        comm = text[text.index("(") + 1 : text.rindex(")")]
        ppid = int(text[text.rindex(")") + 2 :].split()[1])
        if comm == "swtpm" and ppid == me:
            found.append(int(text.split()[0]))
    return found
