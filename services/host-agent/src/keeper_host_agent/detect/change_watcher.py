"""inotify first, a stat-only rescan as the safety net.

inotify tells within milliseconds that a TPM or NVRAM file was written; the periodic rescan
catches what inotify cannot (a directory created before its watch was added, a queue
overflow) at the cost of a few `lstat` calls per VM.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import structlog
from asyncinotify import Inotify, Mask, Watch

from keeper_host_agent.detect.state_tracker import StateTracker
from keeper_shared.messages.types import StateKind
from keeper_shared.state_format.tpm_archive import ALLOWED_TPM_FILE_NAMES

log = structlog.get_logger(__name__)

_MASK = Mask.CLOSE_WRITE | Mask.MOVED_TO | Mask.CREATE | Mask.DELETE | Mask.MODIFY | Mask.ONLYDIR


class ChangeWatcher:
    """Keeps inotify watches in line with the tracked VMs and pokes the tracker."""

    def __init__(self, tracker: StateTracker, *, rescan_interval_s: float) -> None:
        self._tracker = tracker
        self._rescan_interval_s = rescan_interval_s
        self._inotify = Inotify()
        self._watches: dict[str, Watch] = {}
        self._tpm_dirs: dict[str, str] = {}
        self._nvram_files: dict[str, str] = {}
        self._parents: dict[str, str] = {}
        self._wanted: set[str] = set()
        self._layout_seen: int | None = None
        """The tracker's layout generation the paths above were computed for."""

    def close(self) -> None:
        """Release the inotify descriptor."""
        self._inotify.close()

    def sync_watches(self) -> None:
        """Watch every tracked TPM directory and NVRAM directory that exists now."""
        if self._layout_seen != self._tracker.layout_generation:
            # The paths are computed again only when VMs or their paths changed: on an
            # idle host with 1,000 VMs this was most of every rescan's work.
            self._layout_seen = self._tracker.layout_generation
            self._tpm_dirs = self._tracker.paths_by_kind(StateKind.TPM)
            self._nvram_files = self._tracker.paths_by_kind(StateKind.NVRAM)
            # A TPM directory appears only when libvirt (or a prepare) creates it, so its
            # parent and the swtpm root are watched too: their CREATE events add the missing
            # watch.
            self._parents = {
                str(Path(path).parent): vm_id for path, vm_id in self._tpm_dirs.items()
            }
            wanted = set(self._tpm_dirs) | set(self._parents)
            wanted |= {str(Path(path).parent.parent) for path in self._tpm_dirs}
            wanted |= {str(Path(path).parent) for path in self._nvram_files}
            self._wanted = wanted
        wanted = self._wanted
        for path in set(self._watches) - wanted:
            with contextlib.suppress(OSError, KeyError):
                self._inotify.rm_watch(self._watches.pop(path))
        for path in wanted - set(self._watches):
            try:
                self._watches[path] = self._inotify.add_watch(path, _MASK)
            except OSError:
                continue  # not created yet; the rescan adds it once it exists

    async def watch_inotify(self) -> None:
        """Poke the tracker for every event on a tracked file, until cancelled."""
        async for event in self._inotify:
            # An overflow event belongs to no watch (its path is None): check it first.
            if event.mask & Mask.Q_OVERFLOW:
                self._tracker.rescan()
                continue
            if event.path is None:
                continue
            if event.mask & Mask.ISDIR and event.mask & Mask.CREATE:
                self.sync_watches()
                # libvirt creates `<uuid>/tpm2` in one `mkdir -p` and swtpm writes at once, so
                # by now tpm2 and its files may predate the watches just added: read them now,
                # whether the directory created was `<uuid>` or `tpm2`.
                created = str(event.path)
                created_for = self._parents.get(created) or self._tpm_dirs.get(created)
                if created_for is not None:
                    self._tracker.poke(created_for, StateKind.TPM)
                continue
            vm_id = self._tpm_dirs.get(str(event.path.parent))
            if vm_id is not None:
                # Only the state files make the state. swtpm writes a temp file (TMP2-00...)
                # and renames it over the state file: poking on the temp file's CREATE starts
                # the first read before the rename, which then costs a second window.
                if event.path.name in ALLOWED_TPM_FILE_NAMES:
                    self._tracker.poke(vm_id, StateKind.TPM)
                continue
            vm_id = self._nvram_files.get(str(event.path))
            if vm_id is not None:
                self._tracker.poke(vm_id, StateKind.NVRAM)

    async def rescan_periodically(self) -> None:
        """The safety net: stat everything every interval, until cancelled."""
        while True:
            await asyncio.sleep(self._rescan_interval_s)
            self.sync_watches()
            moved = self._tracker.rescan()
            if moved:
                log.info("rescan found changes inotify missed or has not reported", count=moved)
