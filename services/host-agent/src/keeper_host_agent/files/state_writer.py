"""Putting TPM and NVRAM state into place on the host before a VM starts (invariant 5).

The writer runs as root and its inputs come from the network, so every step assumes a
hostile directory tree: the VM id must be a canonical UUID, each directory below the swtpm
root is opened with ``O_NOFOLLOW`` and everything after that is done relative to the open
descriptor (``dir_fd=``), so a symlink planted beforehand, or swapped in for a path
component while the write runs, is refused instead of followed. Files are written to a
temporary file in the target directory, fsynced and renamed, then the directory is fsynced.
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path, PurePosixPath

from keeper_host_agent.files.permall_check import ImplausiblePermallError, check_permall
from keeper_shared.state_format.tpm_archive import (
    ALLOWED_TPM_FILE_NAMES,
    DEFAULT_LIMITS,
    MAIN_STATE_FILE_NAME,
    ArchiveLimits,
    UnsafeArchiveError,
    check_tpm_state_files,
    safe_name_repr,
)

VM_DIR_MODE = 0o711
"""As libvirt creates ``<root>/<uuid>``: root's, but the swtpm user may pass through it."""

TPM2_DIR_MODE = 0o700
"""As libvirt creates ``<root>/<uuid>/tpm2``: private to the swtpm user."""

STATE_FILE_MODE = 0o600
"""swtpm state and the NVRAM file are private to the user the emulator runs as."""

TPM2_DIR_NAME = "tpm2"

_MAX_VM_ID_LENGTH = 36
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_TEMP_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class InvalidVmIdError(ValueError):
    """A VM id is not the canonical text of a UUID."""


class UnsafeStateWriteError(ValueError):
    """State cannot be written without risking a write outside its place."""


def validate_vm_id(value: str) -> uuid.UUID:
    """Return the UUID for ``value`` if it is canonical UUID text, else raise.

    VM ids become directory names, so only the 36-character hyphenated form is accepted
    (either case); braces, ``urn:uuid:`` prefixes, missing hyphens, paths and anything else
    raise `InvalidVmIdError`.
    """
    if not isinstance(value, str):
        raise InvalidVmIdError(f"VM id must be a string, not {type(value).__name__}")
    if len(value) != _MAX_VM_ID_LENGTH:
        raise InvalidVmIdError(
            f"VM id {safe_name_repr(value)} is {len(value)} characters long; a canonical UUID "
            f"has {_MAX_VM_ID_LENGTH}"
        )
    try:
        parsed = uuid.UUID(value)
    except ValueError:
        raise InvalidVmIdError(f"VM id {safe_name_repr(value)} is not a UUID") from None
    if str(parsed) != value.lower():
        raise InvalidVmIdError(f"VM id {safe_name_repr(value)} is not a canonical UUID")
    return parsed


def write_tpm_state(
    swtpm_root: Path,
    vm_id: str,
    files: Mapping[str, bytes],
    owner: tuple[int, int] | None,
    limits: ArchiveLimits = DEFAULT_LIMITS,
) -> Path:
    """Replace the swtpm state of one VM with ``files`` and return its ``tpm2`` directory.

    ``swtpm_root`` (libvirt's ``/var/lib/libvirt/swtpm``) is host configuration and must
    already exist. Below it, ``<vm_id>`` and ``tpm2`` are refused when they are symlinks
    or not directories, and created when missing with the modes libvirt gives them: 0711
    for ``<vm_id>`` (so the swtpm user can reach its directory) and 0700 for ``tpm2``.
    Because ``tpm2`` then exists, libvirt skips ``swtpm_setup`` and uses this state. When
    ``owner`` (the swtpm uid, gid) is given, ``tpm2`` and every written file are chowned
    to it; ``<vm_id>`` stays root's, as libvirt leaves it.

    Every new file is first written in full to a temporary file next to its target
    (``O_CREAT|O_EXCL|O_NOFOLLOW``, mode 0600) and fsynced. Until all of them are, the
    existing state is untouched; on any failure the temporary files are removed and the
    error re-raised. Then the commit runs in an order that keeps every crash point a state
    swtpm can load: the old ``volatilestate``/``savestate`` are removed first (a stale one
    would be loaded over the new permall), then ``tpm2-00.permall`` is renamed into place,
    then the other new files, with a directory fsync after each step. A crash mid-commit
    thus leaves the old permall alone (a TPM after power-off), or the new permall with some
    of its companions, and a retry completes the write.

    Raises `InvalidVmIdError` for a bad VM id, `UnsafeStateWriteError` for disallowed file
    names or sizes, a missing permall or one swtpm could not load (`permall_check`), or a
    symlink/non-directory/non-regular file in the way, and `OSError` for I/O failures. All
    of these but I/O failures are raised before anything is created or written.
    """
    vm_uuid = validate_vm_id(vm_id)
    _check_tpm_files(files, limits)
    # libvirt names the directory after the lower-case UUID it formats.
    vm_dir_name = str(vm_uuid)
    root_fd = _open_root(swtpm_root)
    try:
        with (
            # libvirt leaves the VM directory to root; only tpm2 and below are swtpm's.
            _open_subdir(
                root_fd, vm_dir_name, VM_DIR_MODE, None, shown=f"VM directory {vm_dir_name}"
            ) as vm_fd,
            _open_subdir(
                vm_fd, TPM2_DIR_NAME, TPM2_DIR_MODE, owner, shown=f"{vm_dir_name}/tpm2"
            ) as tpm2_fd,
        ):
            _replace_tpm_files(tpm2_fd, files, owner)
    finally:
        os.close(root_fd)
    return swtpm_root / vm_dir_name / TPM2_DIR_NAME


def write_nvram(nvram_path: Path | str, data: bytes, owner: tuple[int, int] | None) -> None:
    """Atomically replace the NVRAM file at ``nvram_path`` with ``data`` (mode 0600).

    ``nvram_path`` is the ``<nvram>`` element of the domain XML as written (pass the text
    to have it checked before `Path` normalises it). It must be absolute, free of ``..``
    and name a file; its parent must be an existing directory that is not itself a
    symlink (higher components are host configuration, e.g. a relocated
    ``/var/lib/libvirt``, and are followed), and the target must be a regular file if it
    exists. The data goes to a temporary file in the same directory, is fsynced, chowned to
    ``owner`` when given, renamed over the target, and the directory is fsynced. A failure
    before the rename removes the temporary file and leaves the old NVRAM untouched.
    """
    if not isinstance(data, bytes):
        raise UnsafeStateWriteError(f"NVRAM data must be bytes, not {type(data).__name__}")
    parent, name = _split_nvram_path(nvram_path)
    shown = safe_name_repr(str(nvram_path), 200)
    try:
        parent_fd = os.open(parent, _DIR_FLAGS)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise UnsafeStateWriteError(
                f"parent directory of NVRAM path {shown} is a symlink or not a directory"
            ) from None
        if exc.errno == errno.ENOENT:
            raise UnsafeStateWriteError(
                f"parent directory of NVRAM path {shown} does not exist"
            ) from None
        raise
    try:
        _check_target(parent_fd, name, f"NVRAM file {shown}")
        temp_name = _write_temp(parent_fd, name, data, owner)
        try:
            os.replace(temp_name, name, src_dir_fd=parent_fd, dst_dir_fd=parent_fd)
        except BaseException:
            _unlink_quietly(parent_fd, temp_name)
            raise
        os.fsync(parent_fd)
    finally:
        os.close(parent_fd)


def _check_tpm_files(files: Mapping[str, bytes], limits: ArchiveLimits) -> None:
    try:
        check_tpm_state_files(files, limits)
        check_permall(files[MAIN_STATE_FILE_NAME])
    except UnsafeArchiveError as error:
        raise UnsafeStateWriteError(str(error)) from None
    except ImplausiblePermallError as error:
        # Written, it would replace a TPM swtpm loads with one it refuses: the VM would
        # not start, or libvirt would manufacture a blank TPM in its place.
        raise UnsafeStateWriteError(
            f"{error}; the TPM state on this host was left as it was"
        ) from None


def _open_root(swtpm_root: Path) -> int:
    try:
        return os.open(swtpm_root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        raise UnsafeStateWriteError(
            f"swtpm state root {safe_name_repr(str(swtpm_root), 200)} is not an existing directory"
        ) from None


@contextmanager
def _open_subdir(
    parent_fd: int, name: str, mode: int, owner: tuple[int, int] | None, *, shown: str
) -> Iterator[int]:
    """Open (creating when missing) directory ``name`` below ``parent_fd``, never a symlink."""
    created = False
    try:
        os.mkdir(name, mode, dir_fd=parent_fd)
        created = True
    except FileExistsError:
        pass
    try:
        fd = os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise UnsafeStateWriteError(f"{shown} is a symlink or not a directory") from None
        raise
    try:
        if not stat.S_ISDIR(os.fstat(fd).st_mode):
            raise UnsafeStateWriteError(f"{shown} is not a directory")
        if created:
            # mkdir's mode is filtered by the umask; the result must be exactly ``mode``.
            os.fchmod(fd, mode)
        if owner is not None:
            os.fchown(fd, *owner)
        if created:
            os.fsync(parent_fd)
        yield fd
    finally:
        os.close(fd)


def _replace_tpm_files(
    dir_fd: int, files: Mapping[str, bytes], owner: tuple[int, int] | None
) -> None:
    for name in sorted(ALLOWED_TPM_FILE_NAMES):
        _check_target(dir_fd, name, f"TPM state file {name}")
    temp_names: dict[str, str] = {}
    try:
        for name in sorted(files):
            temp_names[name] = _write_temp(dir_fd, name, files[name], owner)
    except BaseException:
        for temp_name in temp_names.values():
            _unlink_quietly(dir_fd, temp_name)
        raise
    # From here on the old state changes; see write_tpm_state for why in this order.
    try:
        companions = sorted(ALLOWED_TPM_FILE_NAMES - {MAIN_STATE_FILE_NAME})
        for name in companions:
            with suppress(FileNotFoundError):
                os.unlink(name, dir_fd=dir_fd)
        os.fsync(dir_fd)
        _commit(dir_fd, temp_names, MAIN_STATE_FILE_NAME)
        os.fsync(dir_fd)
        for name in sorted(temp_names):
            _commit(dir_fd, temp_names, name)
        os.fsync(dir_fd)
    except BaseException:
        for temp_name in temp_names.values():
            _unlink_quietly(dir_fd, temp_name)
        raise


def _commit(dir_fd: int, temp_names: dict[str, str], name: str) -> None:
    """Rename the temporary file for ``name`` into place and forget it once it is there."""
    os.replace(temp_names[name], name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    del temp_names[name]


def _check_target(dir_fd: int, name: str, shown: str) -> None:
    """Refuse a target that exists as anything but a regular file (symlink, dir, FIFO...).

    rename and unlink never follow a final symlink, so a link swapped in after this check
    is replaced, not written through; the check is there to fail early and clearly on a
    tree that is not what swtpm or libvirt would have left.
    """
    try:
        info = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if not stat.S_ISREG(info.st_mode):
        raise UnsafeStateWriteError(f"{shown} exists and is not a regular file")


def _write_temp(dir_fd: int, name: str, data: bytes, owner: tuple[int, int] | None) -> str:
    """Write ``data`` to a new private temporary file next to ``name``; return its name."""
    # The dot prefix keeps swtpm and libvirt from mistaking a leftover for state; the
    # random part makes O_EXCL collisions with a leftover from a crash practically nil.
    temp_name = f".{name}.keeper-{secrets.token_hex(8)}.tmp"
    fd = os.open(temp_name, _TEMP_FLAGS, STATE_FILE_MODE, dir_fd=dir_fd)
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        # The creation mode is filtered by the umask; the result must be exactly 0600.
        os.fchmod(fd, STATE_FILE_MODE)
        if owner is not None:
            os.fchown(fd, *owner)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        _unlink_quietly(dir_fd, temp_name)
        raise
    os.close(fd)
    return temp_name


def _unlink_quietly(dir_fd: int, name: str) -> None:
    # Cleanup runs while another error propagates; that error is the one to report.
    with suppress(OSError):
        os.unlink(name, dir_fd=dir_fd)


def _split_nvram_path(nvram_path: Path | str) -> tuple[Path, str]:
    text = str(nvram_path)
    shown = safe_name_repr(text, 200)
    if "\0" in text:
        raise UnsafeStateWriteError(f"NVRAM path {shown} contains a NUL character")
    pure = PurePosixPath(text)
    if not pure.is_absolute():
        raise UnsafeStateWriteError(f"NVRAM path {shown} is not absolute")
    if ".." in pure.parts:
        raise UnsafeStateWriteError(f"NVRAM path {shown} contains '..'")
    if pure.name in ("", ".") or text.endswith("/"):
        raise UnsafeStateWriteError(f"NVRAM path {shown} does not name a file")
    return Path(pure.parent), pure.name
