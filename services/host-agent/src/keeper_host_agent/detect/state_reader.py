"""Reading a VM's TPM or NVRAM state from disk, and deciding when it is stable.

A read is trusted only when nothing moved while it happened (stat signature equal before and
after) and a second read one window later gives the same signature and the same hash. swtpm
replaces its file by rename and QEMU writes NVRAM in place; comparing inode, size and mtime
before and after each read catches both.
"""

from __future__ import annotations

import asyncio
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from keeper_shared.messages.types import StateKind
from keeper_shared.runtime.cpu_work import run_sized
from keeper_shared.state_format.blobs import MAX_CANONICAL_SIZE, content_hash
from keeper_shared.state_format.tpm_archive import (
    ALLOWED_TPM_FILE_NAMES,
    ArchiveLimits,
    pack_tpm_state,
    read_tpm_state_dir,
)

FileStat = tuple[str, int, int, int]
"""(name, inode, size, mtime_ns) of one file."""


def signature_size(signature: tuple[FileStat, ...]) -> int:
    """Bytes of the files a signature stats."""
    return sum(size for _name, _inode, size, _mtime in signature)


@dataclass(frozen=True)
class StateSnapshot:
    """The canonical content of one state at one moment, with the stat it was read under."""

    signature: tuple[FileStat, ...]
    content: bytes
    content_hash: str


class StateLocation:
    """Where one kind of one VM's state lives, and how to read it canonically."""

    def __init__(self, kind: StateKind, path: Path) -> None:
        self.kind = kind
        self.path = path
        # (name, path as str) of each file the signature stats, built once: joining Path
        # objects on every call cost more than the lstat calls themselves.
        if kind is StateKind.NVRAM:
            self._stat_targets: tuple[tuple[str, str], ...] = ((path.name, str(path)),)
        else:
            self._stat_targets = tuple(
                (name, os.path.join(path, name)) for name in sorted(ALLOWED_TPM_FILE_NAMES)
            )

    def signature(self) -> tuple[FileStat, ...]:
        """Stat-only fingerprint: cheap enough to run over a thousand VMs every few seconds."""
        entries = []
        for name, target in self._stat_targets:
            try:
                info = os.lstat(target)
            except (FileNotFoundError, NotADirectoryError):
                continue
            entries.append((name, info.st_ino, info.st_size, info.st_mtime_ns))
        return tuple(entries)

    def read_content(self) -> bytes | None:
        """The canonical content, or None when there is no state (yet)."""
        if self.kind is StateKind.NVRAM:
            return _read_regular_file(self.path, MAX_CANONICAL_SIZE[StateKind.NVRAM])
        try:
            files = read_tpm_state_dir(self.path, ArchiveLimits())
        except FileNotFoundError:
            return None
        return pack_tpm_state(files) if files else None

    def read(self) -> UndisturbedRead | None:
        """One read that nothing disturbed, or None when the state moved during it."""
        before = self.signature()
        content = self.read_content()
        if content is None or self.signature() != before:
            return None
        return UndisturbedRead(before, content)

    def snapshot(self) -> StateSnapshot | None:
        """One undisturbed read, hashed."""
        read = self.read()
        return read.hashed() if read is not None else None


@dataclass(frozen=True)
class UndisturbedRead:
    """The content of one read that nothing disturbed, and the stat it was read under."""

    signature: tuple[FileStat, ...]
    content: bytes

    def hashed(self) -> StateSnapshot:
        """This read with the hash of its content."""
        return StateSnapshot(self.signature, self.content, content_hash(self.content))


async def read_stable(
    location: StateLocation, window_s: float, max_rounds: int = 20
) -> StateSnapshot | None:
    """Two consecutive undisturbed reads, ``window_s`` apart, that agree; None if the state
    kept changing for ``max_rounds`` windows or does not exist."""
    # A few lstat calls, made in the loop like the periodic rescan's.
    signature = location.signature()
    if not signature:
        return None  # nothing there yet; its creation is itself an event that pokes again
    # A TPM state (tens of KB, in the page cache) is read in the loop: the trip to a worker
    # thread and back cost more than the read. An NVRAM (540 KB to 4 MB) goes to a thread.
    size = signature_size(signature)
    previous = await run_sized(size, location.read)
    for _ in range(max_rounds):
        await asyncio.sleep(window_s)
        current = await run_sized(size, _read_again, location, previous)
        if isinstance(current, StateSnapshot):
            return current
        previous = current
    return None


def _read_again(
    location: StateLocation, previous: UndisturbedRead | None
) -> StateSnapshot | UndisturbedRead | None:
    """The next read: hashed when it agrees with ``previous`` (stable), else as read."""
    current = location.read()
    # Equal signatures and equal bytes: exact, and a memcmp costs a fraction of a sha256 of
    # 540 KB, so only the read that is kept gets hashed.
    if previous is not None and current is not None and current == previous:
        return current.hashed()
    return current


def _read_regular_file(path: Path, limit: int) -> bytes | None:
    """Read a regular file without following a symlink planted in its place."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
            raise ValueError(f"{path} is not a regular file")
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"{path} is larger than {limit} bytes")
    return data
