"""Running the real ``swtpm`` and its tools as child processes, bounded in time.

The state store's scrubber loads a stored state into a throwaway swtpm, and the host agent
reports its swtpm's version; the demo's and the tests' TPM lab
(``keeper_devtools.swtpm_lab``) builds on the same process control.

Facts this module is built on (swtpm 0.7.1, tpm2-tools 5.4, checked by hand):

- swtpm writes ``tpm2-00.permall`` through on every NV change (``TMP2-00.permall`` plus a
  rename, no fsync), and ``startup-clear`` alone changes it, so starting swtpm on a stored
  state modifies that state: give a throwaway swtpm a copy. Stopping, by ``swtpm_ioctl -s``
  (what libvirt does) or by SIGTERM, does not write it again and leaves no volatile state.
- The unencrypted permall carries no checksum over its content: a truncated file or broken
  headers make swtpm refuse to start, but flipped bytes inside the data go unnoticed, and
  an NV index's bytes are stored in the clear. A successful start is no integrity check.
- swtpm opens its sockets before it loads the state, so an accepted TCP connection does
  not prove the TPM is up; readiness here means a TPM command got a success answer.
- A directory without a permall makes swtpm manufacture a blank TPM silently, so
  :func:`start_swtpm` refuses it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import re
import shutil
import signal
import socket
import struct
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

__all__ = [
    "PERMALL_NAME",
    "REQUIRED_TOOLS",
    "RunningSwtpm",
    "SwtpmError",
    "missing_tools",
    "start_swtpm",
    "swtpm_version",
]

PERMALL_NAME = "tpm2-00.permall"
"""The file in a TPM 2 state directory that holds the whole persistent TPM."""

REQUIRED_TOOLS = (
    "swtpm",
    "swtpm_setup",
    "swtpm_ioctl",
    "tpm2_nvdefine",
    "tpm2_nvwrite",
    "tpm2_nvread",
)
"""Executables this module runs; all must be on PATH."""

_LOG = logging.getLogger(__name__)

_LOCALHOST = "127.0.0.1"
# TPM2_GetRandom(8) without sessions: tag, size, command code, bytesRequested.
_PROBE_COMMAND = struct.pack(">HIIH", 0x8001, 12, 0x0000017B, 8)
_TAIL_LINES = 8
_TAIL_CHARS = 1200
_PORT_ATTEMPTS = 3
# Bounds on every external step, so that nothing here can hang a caller (invariant 7);
# callers wanting less wrap the call in asyncio.timeout.
_TOOL_LIMIT_S = 30.0
_READY_LIMIT_S = 10.0
_STOP_LIMIT_S = 6.0
_VERSION_RE = re.compile(r"version (\d+(?:\.\d+)+)")
_HEX_VALUE_RE = re.compile(r"0x[0-9a-fA-F]+")
_FIELD_VALUE_RE = re.compile(r"\b(value:?|found:?|got:?) -?\d+(?![x\d])")


class SwtpmError(RuntimeError):
    """swtpm or a tpm2-tools command failed; the text never carries TPM secrets."""


@dataclass(frozen=True)
class ToolResult:
    returncode: int
    stdout: bytes
    stderr: bytes


def missing_tools() -> list[str]:
    """Return the names from :data:`REQUIRED_TOOLS` that are not on PATH."""
    return [tool for tool in REQUIRED_TOOLS if shutil.which(tool) is None]


async def run_tool(
    argv: Sequence[str],
    *,
    limit_s: float,
    stdin: bytes | None = None,
    env: Mapping[str, str] | None = None,
    pass_fds: Sequence[int] = (),
) -> ToolResult:
    """Run a command without a shell; kill it on timeout or cancellation."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
            pass_fds=pass_fds,
        )
    except FileNotFoundError:
        raise SwtpmError(
            f"{argv[0]} not found on PATH (install swtpm, swtpm-tools and tpm2-tools)"
        ) from None
    try:
        async with asyncio.timeout(limit_s):
            stdout, stderr = await proc.communicate(stdin)
    except TimeoutError:
        raise SwtpmError(f"{argv[0]} did not finish within {limit_s:g} s") from None
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            # Reap it so no zombie outlives a timeout; should a second cancel interrupt
            # this, the process is dead already and asyncio's child watcher reaps it.
            await proc.wait()
    assert proc.returncode is not None
    return ToolResult(proc.returncode, stdout, stderr)


def tail_output(output: bytes, *, secret: bytes | None = None) -> str:
    """The last lines of a tool's diagnostic output, fit for an exception text.

    Lines that contain the secret in raw, hex or base64 form are withheld; with
    TSS2_LOG forced off none should, this is the second line of defence for invariant 4.
    """
    forms: list[bytes] = []
    if secret:
        forms = [secret, secret.hex().encode(), base64.b64encode(secret)]
    lines: list[str] = []
    for raw in output.splitlines():
        if not raw.strip():
            continue
        if any(form in raw or form in raw.lower() for form in forms):
            lines.append("[line withheld]")
        else:
            lines.append(raw.decode("utf-8", errors="replace").rstrip())
    text = " | ".join(lines[-_TAIL_LINES:])
    if len(text) > _TAIL_CHARS:
        text = "..." + text[-_TAIL_CHARS:]
    return text or "(no output)"


def check_option_value(path: Path) -> None:
    """swtpm splits option values on commas, so a path with one would be misread."""
    if "," in str(path):
        raise SwtpmError(f"swtpm cannot take a path containing a comma: {str(path)!r}")


def make_private_dir(path: Path) -> None:
    """Create ``path`` and any missing parents as 0700 directories."""
    missing = [p for p in (path, *path.parents) if not p.exists()]
    for directory in reversed(missing):
        directory.mkdir(mode=0o700)
        # mkdir's mode is filtered by the umask; the state directory must be exactly 0700.
        directory.chmod(0o700)


def _free_port_pair() -> int:
    """A port P with P and P+1 both free on 127.0.0.1 right now (racy by nature)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as first:
            first.bind((_LOCALHOST, 0))
            port: int = first.getsockname()[1]
            if port >= 65535:
                continue
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as second:
                try:
                    second.bind((_LOCALHOST, port + 1))
                except OSError:
                    continue
                return port
    raise SwtpmError("found no free pair of TCP ports on 127.0.0.1")


class RunningSwtpm:
    """A ``swtpm socket`` child process serving one TPM state over TCP on 127.0.0.1.

    Created by :func:`start_swtpm`. Use it as an async context manager, or call
    :meth:`stop`; either way the process is gone afterwards.
    """

    def __init__(
        self,
        *,
        state_dir: Path,
        port: int,
        proc: asyncio.subprocess.Process,
        workdir: Path,
    ) -> None:
        self._state_dir = state_dir
        self._port = port
        self._proc = proc
        self._workdir = workdir
        self._stopped = False

    @property
    def state_dir(self) -> Path:
        """The TPM state directory this swtpm serves."""
        return self._state_dir

    @property
    def port(self) -> int:
        """The TPM command port; the control channel is on ``port + 1``."""
        return self._port

    @property
    def ctrl_port(self) -> int:
        """The swtpm control channel port."""
        return self._port + 1

    @property
    def pid(self) -> int:
        """The swtpm process id."""
        return self._proc.pid

    @property
    def returncode(self) -> int | None:
        """swtpm's exit status, or None while it runs."""
        return self._proc.returncode

    @property
    def tcti(self) -> str:
        """The TCTI string for tpm2-tools (``TPM2TOOLS_TCTI``)."""
        return f"swtpm:host={_LOCALHOST},port={self._port}"

    @property
    def _log_path(self) -> Path:
        return self._workdir / "swtpm.log"

    def _logtail_output(self) -> str:
        try:
            text = tail_output(self._log_path.read_bytes())
        except OSError:
            return "(no swtpm log)"
        # libtpms quotes the values it found where it expected a magic number or a field
        # ("got 0xfff5ffff", "its value -2"); those are bytes of the state, so they go.
        text = _HEX_VALUE_RE.sub("0x?", text)
        return _FIELD_VALUE_RE.sub(r"\1 ?", text)

    async def _probe(self) -> bool:
        """Send one TPM command; True once the TPM answered it with success."""
        try:
            reader, writer = await asyncio.open_connection(_LOCALHOST, self._port)
        except OSError:
            return False
        try:
            writer.write(_PROBE_COMMAND)
            await writer.drain()
            header = await reader.readexactly(10)
        except (OSError, asyncio.IncompleteReadError):
            # swtpm listens before it loads the state and drops the connection when
            # loading fails; the caller sees the exit on its next round.
            return False
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        _tag, _size, code = struct.unpack(">HII", header)
        if code != 0:
            raise SwtpmError(f"swtpm on port {self._port} answered TPM error 0x{code:x}")
        return True

    async def _wait_ready(self, limit_s: float) -> None:
        deadline = time.monotonic() + limit_s
        while True:
            if self._proc.returncode is not None:
                raise SwtpmError(
                    f"swtpm for {self._state_dir} exited with {self._proc.returncode} "
                    f"before it was ready: {self._logtail_output()}"
                )
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.1, deadline - time.monotonic())):
                    if await self._probe():
                        return
            if time.monotonic() >= deadline:
                raise SwtpmError(
                    f"swtpm for {self._state_dir} not ready within {limit_s:g} s: "
                    f"{self._logtail_output()}"
                )
            await asyncio.sleep(0.02)

    async def stop(self) -> None:
        """Shut swtpm down as libvirt does and wait for it to exit.

        Sends CMD_SHUTDOWN over the control channel (``swtpm_ioctl -s``), then SIGTERM,
        then SIGKILL, within 6 s in all. Idempotent. Raises
        :class:`SwtpmError` if swtpm had died on its own with an error or had to be
        killed; the process is gone either way.
        """
        if self._stopped:
            return
        died_before_stop = self._proc.returncode
        killed = False
        try:
            if self._proc.returncode is None:
                killed = not await self._shut_down(_STOP_LIMIT_S)
        finally:
            if self._proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    self._proc.kill()
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._stopped = True
        if died_before_stop not in (None, 0):
            raise SwtpmError(
                f"swtpm for {self._state_dir} had exited with {died_before_stop} "
                "before it was stopped"
            )
        if killed:
            raise SwtpmError(f"swtpm for {self._state_dir} did not stop and was killed")

    async def _shut_down(self, limit_s: float) -> bool:
        """Graceful first; returns False when it came to SIGKILL."""
        share = limit_s / 3
        try:
            result = await run_tool(
                ["swtpm_ioctl", "-s", "--tcp", f"{_LOCALHOST}:{self.ctrl_port}"],
                limit_s=share,
            )
            if result.returncode != 0:
                _LOG.warning(
                    "swtpm_ioctl -s failed for port %d: %s",
                    self.ctrl_port,
                    tail_output(result.stderr),
                )
        except SwtpmError as exc:
            _LOG.warning("swtpm_ioctl -s failed for port %d: %s", self.ctrl_port, exc)
        if await self._wait_exit(share):
            return True
        _LOG.warning("swtpm pid %d ignored CMD_SHUTDOWN, sending SIGTERM", self.pid)
        with contextlib.suppress(ProcessLookupError):
            self._proc.send_signal(signal.SIGTERM)
        if await self._wait_exit(share):
            return True
        _LOG.warning("swtpm pid %d ignored SIGTERM, killing it", self.pid)
        with contextlib.suppress(ProcessLookupError):
            self._proc.kill()
        await self._proc.wait()
        return False

    async def _wait_exit(self, limit_s: float) -> bool:
        try:
            async with asyncio.timeout(limit_s):
                await self._proc.wait()
        except TimeoutError:
            return False
        return True

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            await self.stop()
        except SwtpmError:
            # Do not hide the error that is already leaving the block behind this one.
            if exc is None:
                raise
            _LOG.warning("swtpm for %s did not stop cleanly", self._state_dir, exc_info=True)


def passphrase_pipe(passphrase: bytes) -> int:
    """A pipe's read end holding ``passphrase``: swtpm reads it from the inherited fd, so the
    value is never in an argument, the environment or a file. (Far below the pipe buffer,
    so writing it before swtpm runs cannot block.)"""
    read_end, write_end = os.pipe()
    try:
        os.write(write_end, passphrase)
    except BaseException:
        os.close(read_end)
        raise
    finally:
        os.close(write_end)
    return read_end


async def _launch(
    state_dir: Path, port: int, work_parent: Path | None, passphrase: bytes | None
) -> RunningSwtpm:
    # The pid file and log live outside the state directory: that directory is archived
    # and restored with an allow-list of names.
    workdir = Path(tempfile.mkdtemp(prefix="keeper-swtpm-", dir=work_parent))
    passphrase_fd: int | None = None
    try:
        check_option_value(workdir)
        argv = [
            "swtpm",
            "socket",
            "--tpm2",
            "--tpmstate",
            f"dir={state_dir}",
            "--server",
            f"type=tcp,port={port},bindaddr={_LOCALHOST}",
            "--ctrl",
            f"type=tcp,port={port + 1},bindaddr={_LOCALHOST}",
            "--flags",
            "not-need-init,startup-clear",
            "--pid",
            f"file={workdir / 'swtpm.pid'}",
        ]
        if passphrase is not None:
            # What libvirt passes for a TPM with <encryption secret>: the state is
            # encrypted with a key derived from the secret's value.
            passphrase_fd = passphrase_pipe(passphrase)
            argv += ["--key", f"pwdfd={passphrase_fd},mode=aes-256-cbc"]
        # A file, not a pipe: nobody reads swtpm's output while it runs.
        with (workdir / "swtpm.log").open("wb") as log:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                pass_fds=() if passphrase_fd is None else (passphrase_fd,),
            )
    except FileNotFoundError:
        shutil.rmtree(workdir, ignore_errors=True)
        raise SwtpmError("swtpm not found on PATH (install swtpm)") from None
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    finally:
        if passphrase_fd is not None:
            os.close(passphrase_fd)
    running = RunningSwtpm(state_dir=state_dir, port=port, proc=proc, workdir=workdir)
    try:
        await running._wait_ready(_READY_LIMIT_S)
    except BaseException:
        with contextlib.suppress(SwtpmError):
            await running.stop()
        raise
    return running


async def start_swtpm(
    state_dir: Path,
    *,
    port: int | None = None,
    work_parent: Path | None = None,
    passphrase: bytes | None = None,
) -> RunningSwtpm:
    """Start ``swtpm socket`` on the TPM 2 state in ``state_dir`` and wait until it serves.

    Listens on 127.0.0.1 ``port`` (commands) and ``port + 1`` (control); with ``port``
    None a free pair is picked. swtpm's pid file and log go into a private directory
    made in ``work_parent`` (the system's temporary directory when None) and removed on
    stop. Returns once a TPM command succeeded, within 10 seconds. Note that starting it
    changes the permall. ``passphrase`` is the value of the libvirt secret an encrypted
    state was written with (a TPM with ``<encryption secret>``); without the right one
    swtpm cannot load such a state.
    Raises :class:`SwtpmError` when the state is missing or swtpm cannot load it.
    """
    state_dir = state_dir.absolute()
    check_option_value(state_dir)
    permall = state_dir / PERMALL_NAME
    if not permall.is_file():
        # swtpm would manufacture a blank TPM here and everything would seem fine.
        raise SwtpmError(f"no TPM state {PERMALL_NAME} in {state_dir}")
    started = time.monotonic()
    attempt = 1
    while True:
        chosen = port if port is not None else _free_port_pair()
        try:
            running = await _launch(state_dir, chosen, work_parent, passphrase)
        except SwtpmError as exc:
            # Another process may take a port between our check and swtpm's bind.
            if port is None and attempt < _PORT_ATTEMPTS and "Address already in use" in str(exc):
                attempt += 1
                continue
            raise
        _LOG.debug(
            "swtpm pid %d serves %s on port %d (ready in %.3f s)",
            running.pid,
            state_dir,
            chosen,
            time.monotonic() - started,
        )
        return running


async def swtpm_version() -> str:
    """The installed swtpm's version, e.g. ``"0.7.1"``, from ``swtpm --version``."""
    result = await run_tool(["swtpm", "--version"], limit_s=_TOOL_LIMIT_S)
    text = (result.stdout + result.stderr).decode("utf-8", errors="replace")
    match = _VERSION_RE.search(text)
    if result.returncode != 0 or match is None:
        raise SwtpmError(
            f"cannot read swtpm's version (exit {result.returncode}): {tail_output(text.encode())}"
        )
    return match.group(1)
