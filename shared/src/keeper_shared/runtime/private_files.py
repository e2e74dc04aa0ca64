"""Files only their owner may read: the keys the services hold (the store's KEK, the sealing
keys of the store and of each host).

Reading refuses a file that is not regular, that group or others may access, or that is
too large to be a key; creating writes the content under a temporary name, fsyncs it and
hard-links it into place (mode 0600), so the file appears complete or not at all and an
existing one is never overwritten. Every error names the file and the problem, never the
content.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from pathlib import Path


class PrivateFileError(Exception):
    """A private file is missing, unsafe, or cannot be made (the text never holds its
    content)."""


def read_private_file(
    path: Path, *, label: str, max_size: int, error: type[PrivateFileError] = PrivateFileError
) -> bytes:
    """The content of ``path``, checked as the module says; ``label`` names the file in
    errors (``"key file"``), which are raised as ``error``. Symlinks are followed, since
    secret mounts (Kubernetes, systemd credentials) are symlinks; the checks apply to the
    file actually opened."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise error(f"cannot open {label} {path}: {exc.strerror}") from None
    try:
        # fstat on the open descriptor, not stat on the path, so the file checked is the
        # file read even if the path is swapped in between.
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise error(f"{label} {path} is not a regular file")
        if st.st_mode & 0o077:
            raise error(
                f"{label} {path} has mode {stat.S_IMODE(st.st_mode):04o}; it must not be "
                "readable or writable by group or others (chmod 600)"
            )
        if st.st_size > max_size:
            raise error(f"{label} {path} is {st.st_size} bytes, far too large for a key")
        with os.fdopen(fd, "rb", closefd=False) as handle:
            return handle.read(max_size)
    finally:
        os.close(fd)


def create_private_file(
    path: Path, content: bytes, *, label: str, error: type[PrivateFileError] = PrivateFileError
) -> None:
    """Create ``path`` holding ``content``, mode 0600; refuses to overwrite an existing file
    (the hard link fails like ``O_EXCL``, atomically). Errors are raised as ``error``."""
    directory = path.parent
    tmp_path = directory / f".{path.name}.{secrets.token_hex(8)}.tmp"
    try:
        fd = os.open(
            tmp_path,
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o600,
        )
    except OSError as exc:
        raise error(f"cannot create {label} in {directory}: {exc.strerror}") from None
    try:
        try:
            # The umask can only remove bits; set the mode explicitly so it is exactly 0600.
            os.fchmod(fd, 0o600)
            os.write(fd, content)
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp_path, path)
        except FileExistsError:
            raise error(f"{label} {path} already exists; refusing to overwrite it") from None
        except OSError as exc:
            raise error(f"cannot create {label} {path}: {exc.strerror}") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
