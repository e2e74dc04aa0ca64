"""Load a stored TPM state into a throwaway swtpm and read its endorsement key.

The scrubber's last check: a TPM version that decrypts and hashes right is also a TPM that
swtpm accepts. The state is written to a private temporary directory (0700, files 0600),
never the stored copy, since starting swtpm rewrites the permall; the directory is removed
afterwards whatever happens. swtpm itself does not notice flipped bytes inside the state
(the permall has no checksum), so this proves usability, not integrity: the hash does that.

The EK is read from the persistent handle ``swtpm_setup --createek`` makes (0x81010001,
the RSA 2048 EK of the TCG EK profile); its public area identifies the TPM. A TPM
manufactured again gets a new EK, which is how a reset TPM is recognised.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import shutil
import signal
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from keeper_shared.swtpm import SwtpmError, missing_tools, start_swtpm

EK_HANDLE: Final = 0x81010001
"""Persistent handle of the RSA EK created by ``swtpm_setup --createek``."""
EK_CERTIFICATE_INDEX: Final = 0x01C00002
"""NV index of the RSA 2048 EK certificate (TCG EK credential profile), written by
``swtpm_setup --create-ek-cert`` (libvirt asks for it)."""

_READPUBLIC: Final = "tpm2_readpublic"
_NVREAD: Final = "tpm2_nvread"
_TOOL_LIMIT_S: Final = 30.0
# tpm2-tools report a missing persistent handle as TPM_RC_HANDLE on parameter 1.
_HANDLE_ABSENT_MARKERS: Final = ("0x18b", "handle is not correct")
_FILE_FLAGS: Final = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_PROBE_PREFIX: Final = "keeper-scrub-"
_PROBE_DIR = re.compile(rf"^{_PROBE_PREFIX}(\d+)-")


@dataclass(frozen=True)
class TpmProbe:
    """What a throwaway swtpm showed about a stored TPM state."""

    ek_sha256: str | None
    """sha256 of the EK's public area (TPM2B_PUBLIC), None when the handle is absent or
    tpm2_readpublic is not installed."""
    ek_public_pem: str | None = None
    """The EK's public key (PEM, SubjectPublicKeyInfo), when asked for and present."""
    ek_certificate_der: bytes | None = None
    """The EK certificate as stored in its NV index, when asked for and present."""


def swtpm_available() -> bool:
    """True when swtpm and its tools are installed beside this process."""
    return not missing_tools()


def ek_readable() -> bool:
    """True when tpm2_readpublic is installed (the EK can be read)."""
    return shutil.which(_READPUBLIC) is not None


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, _FILE_FLAGS, 0o600)
    try:
        os.fchmod(fd, 0o600)
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
    finally:
        os.close(fd)


async def _tpm2_tool(tcti: str, *argv: str) -> bool:
    """Run one tpm2-tools command against ``tcti``: True when it succeeded, False when the
    object it names does not exist (TPM_RC_HANDLE); SwtpmError when it fails otherwise."""
    env = dict(os.environ)
    env["TPM2TOOLS_TCTI"] = tcti
    env["TSS2_LOG"] = "all+NONE"
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    try:
        async with asyncio.timeout(_TOOL_LIMIT_S):
            _stdout, stderr = await proc.communicate()
    except TimeoutError:
        raise SwtpmError(f"{argv[0]} did not finish within {_TOOL_LIMIT_S:g} s") from None
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
    if proc.returncode != 0:
        text = stderr.decode("utf-8", errors="replace").lower()
        if any(marker in text for marker in _HANDLE_ABSENT_MARKERS):
            return False
        raise SwtpmError(f"{argv[0]} failed (exit {proc.returncode})")
    return True


async def _read_ek(tcti: str, workdir: Path) -> str | None:
    out = workdir / "ek.pub"
    found = await _tpm2_tool(tcti, _READPUBLIC, "-c", f"0x{EK_HANDLE:x}", "-o", str(out))
    return hashlib.sha256(out.read_bytes()).hexdigest() if found else None


async def _read_ek_public_pem(tcti: str, workdir: Path) -> str | None:
    out = workdir / "ek.pem"
    argv = (_READPUBLIC, "-c", f"0x{EK_HANDLE:x}", "-f", "pem", "-o", str(out))
    return out.read_text(encoding="ascii") if await _tpm2_tool(tcti, *argv) else None


async def _read_ek_certificate(tcti: str, workdir: Path) -> bytes | None:
    out = workdir / "ek-cert.der"
    argv = (_NVREAD, "-C", "o", f"0x{EK_CERTIFICATE_INDEX:x}", "-o", str(out))
    return out.read_bytes() if await _tpm2_tool(tcti, *argv) else None


async def probe_tpm_state(
    files: Mapping[str, bytes],
    *,
    temp_dir: Path | None = None,
    read_ek: bool = True,
    ek_details: bool = False,
    passphrase: bytes | None = None,
) -> TpmProbe:
    """Start a throwaway swtpm on a copy of ``files`` (validated TPM state files, as
    `keeper_shared.state_format.tpm_archive.unpack_tpm_state` returns them) and read the EK;
    with ``ek_details`` also its public key as PEM and its certificate, for attestation.
    ``passphrase``: the value of the libvirt secret an encrypted state was written with.

    Raises `SwtpmError` when swtpm does not load the state or a tool fails, `OSError` when
    the temporary directory cannot be made. The directory is gone when this returns.
    """
    # mkdtemp creates the directory 0700; the state directory inside is 0700 too. The name
    # carries our pid so that a later scrubber can tell a directory left by a killed one.
    workdir = Path(tempfile.mkdtemp(prefix=f"{_PROBE_PREFIX}{os.getpid()}-", dir=temp_dir))
    try:
        state_dir = workdir / "tpm2"
        state_dir.mkdir(mode=0o700)
        state_dir.chmod(0o700)
        for name, data in files.items():
            # Names are allow-listed by unpack_tpm_state; O_EXCL|O_NOFOLLOW all the same.
            _write_private(state_dir / name, data)
        try:
            # swtpm's own pid file and log go inside too, so a reaper finds everything here.
            async with await start_swtpm(
                state_dir, work_parent=workdir, passphrase=passphrase
            ) as tpm:
                readable = ek_readable()
                ek = await _read_ek(tpm.tcti, workdir) if read_ek and readable else None
                details = ek_details and readable and ek is not None
                public_pem = await _read_ek_public_pem(tpm.tcti, workdir) if details else None
                certificate = await _read_ek_certificate(tpm.tcti, workdir) if details else None
        except SwtpmError as error:
            # The throwaway path says nothing and differs every time; keep what swtpm said.
            raise SwtpmError(str(error).replace(str(state_dir), "the copy")) from None
        return TpmProbe(ek_sha256=ek, ek_public_pem=public_pem, ek_certificate_der=certificate)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _swtpm_serving(state_dir: Path) -> list[int]:
    """Pids of swtpm processes serving ``state_dir`` (found by their command line)."""
    wanted = f"dir={state_dir}".encode()
    found: list[int] = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue  # gone meanwhile
        if argv and os.path.basename(argv[0]) == b"swtpm" and wanted in argv:
            found.append(int(cmdline.parent.name))
    return found


def reap_stale_probes(temp_dir: Path | None = None) -> int:
    """Remove what a scrubber killed mid-probe (SIGKILL runs no cleanup) left behind:
    its throwaway swtpm, which would otherwise run on forever, and its directory.

    Only directories named by this module whose owner process is gone, owned by this
    user, are touched; a live scrubber's probes (in this or another process) are left
    alone. Returns how many directories were removed.
    """
    root = temp_dir if temp_dir is not None else Path(tempfile.gettempdir())
    removed = 0
    for entry in root.glob(f"{_PROBE_PREFIX}*"):
        match = _PROBE_DIR.match(entry.name)
        if match is None or _pid_alive(int(match.group(1))):
            continue
        try:
            info = entry.lstat()
        except FileNotFoundError:
            continue
        if info.st_uid != os.getuid() or not entry.is_dir() or entry.is_symlink():
            continue
        for pid in _swtpm_serving((entry / "tpm2").absolute()):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(entry, ignore_errors=True)
        removed += 1
    return removed
