"""The canonical TPM blob: a deterministic ustar archive of a swtpm state directory.

swtpm keeps a VM's TPM in ``<root>/<vm-uuid>/tpm2/``: ``tpm2-00.permall`` (the permanent
state) and, at times, ``tpm2-00.volatilestate`` and ``tpm2-00.savestate``. Those files are
packed into one ustar archive whose bytes depend only on the names and contents, so equal
state hashes equally and the content hash identifies a version.

An archive that arrives from the network is untrusted (invariant 5). `unpack_tpm_state`
therefore does not let `tarfile.TarFile` walk it: `TarFile.next()` treats a corrupt header
after the first member as the end of the archive (silently dropping the rest), follows pax
and GNU long-name headers recursively, and counts "contiguous" and sparse members as regular
files. Instead each 512-byte header is decoded on its own with `tarfile.TarInfo.frombuf`
(checksum, numbers, ustar prefix) and every byte of the archive is accounted for: headers,
data, zero padding and the end-of-archive marker. Only POSIX ustar regular files with an
allow-listed name pass, and nothing is returned unless every member passed.

Messages name members (escaped and shortened) but never contain file content (invariant 4).
"""

from __future__ import annotations

import errno
import io
import os
import stat
import tarfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from keeper_shared.state_format.compression import BlobFormatError

MAIN_STATE_FILE_NAME = "tpm2-00.permall"
"""swtpm's permanent state: a TPM blob without it is not a TPM."""

ALLOWED_TPM_FILE_NAMES: frozenset[str] = frozenset(
    {MAIN_STATE_FILE_NAME, "tpm2-00.volatilestate", "tpm2-00.savestate"}
)
"""The only files of a swtpm state directory that are kept, packed and written back."""

_BLOCK = tarfile.BLOCKSIZE
_ZERO_BLOCK = bytes(_BLOCK)
_USTAR_MAGIC = tarfile.POSIX_MAGIC  # "ustar\0" and version "00"
_REGULAR_TYPES = frozenset({tarfile.REGTYPE, tarfile.AREGTYPE})
_FILE_MODE = 0o600
_NAME_REPR_LIMIT = 100
_OPEN_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_OPEN_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_MEMBER_KINDS: Mapping[bytes, str] = MappingProxyType(
    {
        tarfile.SYMTYPE: "a symbolic link",
        tarfile.LNKTYPE: "a hard link",
        tarfile.CHRTYPE: "a character device",
        tarfile.BLKTYPE: "a block device",
        tarfile.FIFOTYPE: "a FIFO",
        tarfile.DIRTYPE: "a directory",
        tarfile.CONTTYPE: "a contiguous file",
        tarfile.GNUTYPE_SPARSE: "a GNU sparse file",
        tarfile.GNUTYPE_LONGNAME: "a GNU long-name header",
        tarfile.GNUTYPE_LONGLINK: "a GNU long-link header",
        tarfile.XHDTYPE: "a pax extended header",
        tarfile.XGLTYPE: "a pax global header",
        tarfile.SOLARIS_XHDTYPE: "a Solaris extended header",
    }
)


class UnsafeArchiveError(BlobFormatError):
    """A TPM archive is malformed or contains something other than allowed regular files."""


class UnsafeStateDirError(ValueError):
    """A live swtpm state directory holds something that must not be read or published."""


@dataclass(frozen=True)
class ArchiveLimits:
    """Upper bounds applied to every TPM archive and state directory.

    swtpm's permall is 6-20 KB, so these leave ample room while keeping a hostile archive
    from costing more than a few MiB.
    """

    max_member_size: int = 1024 * 1024
    max_total_size: int = 4 * 1024 * 1024
    max_members: int = 8

    def max_archive_size(self) -> int:
        """The longest archive these limits can admit, for bounding decompression.

        Counts the largest data plus, per member, a header and worst-case padding, then the
        end-of-archive marker and a final ``tarfile.RECORDSIZE`` of zero padding.
        """
        return self.max_total_size + self.max_members * 2 * _BLOCK + 2 * _BLOCK + tarfile.RECORDSIZE


DEFAULT_LIMITS = ArchiveLimits()


def safe_name_repr(value: str, limit: int = _NAME_REPR_LIMIT) -> str:
    """Return ``repr(value)`` cut to at most ``limit`` characters, for error messages.

    Names come from untrusted input, so they are escaped (no control characters or newlines
    reach a log line) and shortened (a 10 KB name does not flood one).
    """
    text = repr(value[: limit + 1])
    if len(text) > limit:
        text = text[: max(limit - 3, 0)] + "..."
    return text


def pack_tpm_state(files: Mapping[str, bytes], limits: ArchiveLimits = DEFAULT_LIMITS) -> bytes:
    """Pack TPM state files into the canonical, deterministic ustar archive.

    Members are sorted by name and carry fixed metadata (mode 0600, uid/gid 0, empty
    owner names, mtime 0), so equal state always gives equal bytes and an equal sha256.
    The state must contain ``tpm2-00.permall`` and only allow-listed names, and it must fit
    ``limits``: an archive this side could not unpack is never produced.
    """
    check_tpm_state_files(files, limits)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:", format=tarfile.USTAR_FORMAT) as archive:
        for name in sorted(files):
            data = files[name]
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = _FILE_MODE
            info.type = tarfile.REGTYPE
            info.mtime = 0
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def unpack_tpm_state(archive: bytes, limits: ArchiveLimits = DEFAULT_LIMITS) -> dict[str, bytes]:
    """Validate an untrusted TPM archive completely and return its files by name.

    Every member must be a POSIX ustar regular file named exactly one of
    `ALLOWED_TPM_FILE_NAMES`, appear once, carry no set-uid/set-gid/sticky bit and fit the
    size limits; ``tpm2-00.permall`` must be present; the archive must end with the
    end-of-archive marker followed by nothing but zero bytes. Links, devices, FIFOs,
    directories, pax and GNU extension headers, paths, truncation and trailing data are all
    refused with `UnsafeArchiveError`, and nothing is returned unless all of it passed.
    """
    if not isinstance(archive, bytes):
        raise UnsafeArchiveError(f"archive must be bytes, not {type(archive).__name__}")
    if len(archive) > limits.max_archive_size():
        raise UnsafeArchiveError(
            f"archive is {len(archive)} bytes, more than the {limits.max_archive_size()} allowed"
        )
    files: dict[str, bytes] = {}
    offset = 0
    total = 0
    members = 0
    while True:
        header = archive[offset : offset + _BLOCK]
        if len(header) < _BLOCK:
            raise UnsafeArchiveError(
                f"archive is truncated: it ends at byte {len(archive)} without the "
                "end-of-archive marker"
            )
        if header == _ZERO_BLOCK:
            _check_archive_end(archive, offset)
            break
        members += 1
        if members > limits.max_members:
            raise UnsafeArchiveError(
                f"archive has more than the {limits.max_members} members allowed"
            )
        info = _decode_header(header, members)
        name = _check_member(info, header, members, files, limits)
        total += info.size
        if total > limits.max_total_size:
            raise UnsafeArchiveError(
                f"archive content exceeds the {limits.max_total_size} bytes allowed in total "
                f"at member {safe_name_repr(name)}"
            )
        data_start = offset + _BLOCK
        data_end = data_start + info.size
        padded_end = data_start + _padded(info.size)
        data = archive[data_start:data_end]
        if len(data) != info.size:
            raise UnsafeArchiveError(
                f"archive is truncated: member {safe_name_repr(name)} declares {info.size} "
                f"bytes but only {len(data)} are present"
            )
        padding = archive[data_end:padded_end]
        if len(padding) != padded_end - data_end:
            raise UnsafeArchiveError(
                f"archive is truncated inside the padding of member {safe_name_repr(name)}"
            )
        if padding.strip(b"\0"):
            # Padding is NUL by definition; anything else is data hiding outside a member.
            raise UnsafeArchiveError(
                f"member {safe_name_repr(name)} is followed by non-zero padding"
            )
        files[name] = data
        offset = padded_end
    if MAIN_STATE_FILE_NAME not in files:
        raise UnsafeArchiveError(f"archive has no {MAIN_STATE_FILE_NAME} member")
    return files


def read_tpm_state_dir(tpm2_dir: Path, limits: ArchiveLimits = DEFAULT_LIMITS) -> dict[str, bytes]:
    """Read the allow-listed files of a live swtpm ``tpm2`` directory.

    Only `ALLOWED_TPM_FILE_NAMES` are opened; every other entry is ignored on purpose:
    swtpm holds a ``.lock`` file and writes new state to a temporary file (``TMP2-00...``)
    before renaming it, and neither belongs to the state. The directory and each file are
    opened with ``O_NOFOLLOW`` and checked with ``fstat`` on the open descriptor, so a
    symlink (or a swap between check and open) is refused rather than followed; FIFOs and
    devices are refused without blocking; hard-linked files are refused so a link to a
    host file cannot be published as TPM state. Sizes are bounded by ``limits``.

    Returns name -> bytes for the files present (possibly without ``tpm2-00.permall`` when
    swtpm has not created it yet: the caller decides what an incomplete state means).
    Raises `FileNotFoundError` when ``tpm2_dir`` does not exist and `UnsafeStateDirError`
    for anything unsafe. Reads are not atomic across files; callers detect torn reads by
    reading twice (invariant 6).
    """
    try:
        dir_fd = os.open(tpm2_dir, _OPEN_DIR_FLAGS)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise UnsafeStateDirError(
                f"TPM state directory {safe_name_repr(str(tpm2_dir), 200)} is a symlink "
                "or not a directory"
            ) from None
        raise
    try:
        files: dict[str, bytes] = {}
        total = 0
        for name in sorted(ALLOWED_TPM_FILE_NAMES):
            data = _read_state_file(dir_fd, name, limits)
            if data is None:
                continue
            total += len(data)
            if total > limits.max_total_size:
                raise UnsafeStateDirError(
                    f"TPM state exceeds the {limits.max_total_size} bytes allowed in total"
                )
            files[name] = data
        return files
    finally:
        os.close(dir_fd)


def _read_state_file(dir_fd: int, name: str, limits: ArchiveLimits) -> bytes | None:
    try:
        fd = os.open(name, _OPEN_FILE_FLAGS, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafeStateDirError(f"TPM state file {name} is a symlink") from None
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise UnsafeStateDirError(f"TPM state file {name} is not a regular file")
        if info.st_nlink != 1:
            raise UnsafeStateDirError(
                f"TPM state file {name} has {info.st_nlink} hard links; swtpm makes none"
            )
        if info.st_size > limits.max_member_size:
            raise UnsafeStateDirError(
                f"TPM state file {name} is {info.st_size} bytes, more than the "
                f"{limits.max_member_size} allowed"
            )
        data = _read_at_most(fd, limits.max_member_size + 1)
        if len(data) > limits.max_member_size:
            raise UnsafeStateDirError(
                f"TPM state file {name} grew beyond the {limits.max_member_size} bytes allowed"
            )
        return data
    finally:
        os.close(fd)


def _read_at_most(fd: int, limit: int) -> bytes:
    chunks: list[bytes] = []
    remaining = limit
    while remaining > 0:
        chunk = os.read(fd, min(remaining, 1024 * 1024))
        if not chunk:
            break
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def check_tpm_state_files(files: Mapping[str, bytes], limits: ArchiveLimits) -> None:
    """Refuse state that is not allow-listed names of bytes within ``limits``, or that lacks
    its permall (a state without it would make swtpm silently create a fresh TPM)."""
    if len(files) > limits.max_members:
        raise UnsafeArchiveError(f"TPM state has more than {limits.max_members} files")
    total = 0
    for name, data in files.items():
        if name not in ALLOWED_TPM_FILE_NAMES:
            raise UnsafeArchiveError(
                f"TPM state file name {safe_name_repr(name)} is not one of the allowed names"
            )
        if not isinstance(data, bytes):
            raise UnsafeArchiveError(
                f"TPM state file {name} must be bytes, not {type(data).__name__}"
            )
        if len(data) > limits.max_member_size:
            raise UnsafeArchiveError(
                f"TPM state file {name} is {len(data)} bytes, more than the "
                f"{limits.max_member_size} allowed"
            )
        total += len(data)
    if total > limits.max_total_size:
        raise UnsafeArchiveError(
            f"TPM state is {total} bytes, more than the {limits.max_total_size} allowed"
        )
    if MAIN_STATE_FILE_NAME not in files:
        raise UnsafeArchiveError(f"TPM state has no {MAIN_STATE_FILE_NAME}")


def _decode_header(header: bytes, index: int) -> tarfile.TarInfo:
    try:
        # surrogateescape keeps undecodable names representable so the allow-list check,
        # not a decoding error, is what refuses them, with the name shown escaped.
        return tarfile.TarInfo.frombuf(header, "utf-8", "surrogateescape")
    except tarfile.TarError as exc:
        # tarfile's header errors are fixed phrases ("bad checksum"), never header bytes.
        raise UnsafeArchiveError(f"member {index} has an invalid header ({exc})") from None


def _check_member(
    info: tarfile.TarInfo,
    header: bytes,
    index: int,
    seen: Mapping[str, bytes],
    limits: ArchiveLimits,
) -> str:
    shown = safe_name_repr(info.name)
    if info.type not in _REGULAR_TYPES:
        kind = _MEMBER_KINDS.get(info.type, f"of unknown type {info.type!r}")
        raise UnsafeArchiveError(f"member {shown} is {kind}; only regular files are allowed")
    if header[257:265] != _USTAR_MAGIC:
        # GNU and v7 headers would need their own rules; the canonical blob is POSIX ustar.
        raise UnsafeArchiveError(f"member {index} ({shown}) is not a POSIX ustar header")
    if info.name not in ALLOWED_TPM_FILE_NAMES:
        raise UnsafeArchiveError(
            f"member name {shown} is not one of the allowed TPM state file names"
        )
    if info.name in seen:
        raise UnsafeArchiveError(f"member {shown} appears more than once")
    if info.linkname:
        raise UnsafeArchiveError(f"regular member {shown} declares a link target")
    if info.mode & ~0o777:
        raise UnsafeArchiveError(
            f"member {shown} has mode {info.mode:#o}: set-uid, set-gid, sticky and unknown "
            "bits are refused"
        )
    if info.size < 0:
        raise UnsafeArchiveError(f"member {shown} declares a negative size")
    if info.size > limits.max_member_size:
        raise UnsafeArchiveError(
            f"member {shown} declares {info.size} bytes, more than the "
            f"{limits.max_member_size} allowed"
        )
    return info.name


def _check_archive_end(archive: bytes, offset: int) -> None:
    trailer = archive[offset:]
    if len(trailer) < 2 * _BLOCK:
        raise UnsafeArchiveError("archive is truncated inside the end-of-archive marker")
    if trailer.strip(b"\0"):
        raise UnsafeArchiveError("archive has non-zero bytes after the end-of-archive marker")


def _padded(size: int) -> int:
    return -(-size // _BLOCK) * _BLOCK
