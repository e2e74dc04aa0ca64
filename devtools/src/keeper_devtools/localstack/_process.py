"""Process and port helpers shared by the RabbitMQ node and the Redis server."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import time
from pathlib import Path

from keeper_devtools.localstack.errors import INSTALL_HINT, LocalStackError, NotInstalledError

_POLL_SECONDS = 0.05
# Well clear of the well-known and most registered ports that services commonly use.
_FIRST_PRIVATE_PORT = 10000


def find_binary(name: str, *preferred_dirs: Path) -> str:
    """Return the path of ``name``, looking in ``preferred_dirs`` before ``PATH``."""
    for directory in preferred_dirs:
        candidate = directory / name
        if os.access(candidate, os.X_OK):
            return str(candidate)
    # /usr/sbin is often missing from a non-root PATH although Debian installs tools there.
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/sbin:/bin")
    if found is None:
        raise NotInstalledError(f"{name} is not installed; {INSTALL_HINT}")
    return found


def free_tcp_ports(count: int) -> list[int]:
    """Return ``count`` distinct TCP ports on 127.0.0.1 that were free a moment ago.

    The ports are drawn at random below the kernel's ephemeral range: a port inside it can
    be taken at any moment by an outgoing connection or by a program listening on "any
    port" (rabbitmqctl's own Erlang distribution does that). Another process can still
    take one before the caller binds it; start then fails with a clear "port in use" error.
    """
    low = _ephemeral_range_start()
    ports: list[int] = []
    with contextlib.ExitStack() as stack:
        for _ in range(count * 100):
            if len(ports) == count:
                break
            port = _FIRST_PRIVATE_PORT + secrets.randbelow(max(1, low - _FIRST_PRIVATE_PORT))
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            if port not in ports:
                ports.append(port)
    if len(ports) < count:
        raise LocalStackError(f"found no {count} free TCP ports below {low}")
    return ports


def _ephemeral_range_start() -> int:
    try:
        text = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text(encoding="ascii")
        return max(int(text.split()[0]), _FIRST_PRIVATE_PORT + 1000)
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def read_pid(pid_file: Path) -> int | None:
    """Return the pid written in ``pid_file``, or None when there is no usable one."""
    try:
        text = pid_file.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() else None


def process_alive(pid: int, marker: str) -> bool:
    """Tell whether ``pid`` is a running process whose command line contains ``marker``.

    The command line is the raw ``/proc/<pid>/cmdline``, arguments separated by NUL bytes,
    so a marker can pin a whole argument with ``\\0`` on each side. The marker guards
    against a stale pid file whose pid was reused by an unrelated process.
    """
    try:
        cmdline = (Path("/proc") / str(pid) / "cmdline").read_bytes()
    except OSError:
        return False
    return marker.encode() in cmdline and process_exists(pid)


def process_exists(pid: int) -> bool:
    """Tell whether any thread of ``pid`` still runs.

    A zombie counts as gone (this machine's init reaps daemonized children only now and
    then), but only once every thread is: a multi-threaded server's main thread turns
    zombie first while the others still hold its sockets and files.
    """
    try:
        tasks = list((Path("/proc") / str(pid) / "task").iterdir())
    except OSError:
        return False
    for task in tasks:
        try:
            stat = (task / "stat").read_text(encoding="ascii", errors="replace")
        except OSError:
            continue
        # The state follows the command name, which is in parentheses and may hold spaces.
        if stat.rsplit(")", 1)[-1].split()[0] not in ("Z", "X"):
            return True
    return False


def live_pid(pid_file: Path, marker: str) -> int | None:
    """Return the pid from ``pid_file`` when that process is alive and ours, else None."""
    pid = read_pid(pid_file)
    if pid is not None and process_alive(pid, marker):
        return pid
    return None


def wait_gone(pid: int, timeout: float) -> bool:
    """Wait up to ``timeout`` seconds for the process to end; True when it did."""
    deadline = time.monotonic() + timeout
    # No marker check here: once the main thread exits its command line reads empty.
    while process_exists(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(_POLL_SECONDS)
    return True


def send_signal(pid: int, sig: signal.Signals) -> None:
    """Send ``sig`` to ``pid``, ignoring a process that has already gone."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def terminate(pid: int, grace: float) -> None:
    """End the process: SIGTERM, then SIGKILL when it is still there after ``grace`` s."""
    send_signal(pid, signal.SIGTERM)
    if wait_gone(pid, grace):
        return
    send_signal(pid, signal.SIGKILL)
    if not wait_gone(pid, 10.0):
        raise LocalStackError(f"process {pid} survived SIGKILL")


def port_open(port: int) -> bool:
    """Tell whether something accepts TCP connections on 127.0.0.1:``port``."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def port_free(port: int) -> bool:
    """Tell whether a server could bind 127.0.0.1:``port`` now.

    Binding is the one reliable test: a connection attempt cannot tell a free port from a
    listener whose backlog is full, nor see a socket that is bound but not listening.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # As servers do, so that connections lingering in TIME_WAIT do not count.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def wait_port_free(port: int, timeout: float = 5.0) -> bool:
    """Wait up to ``timeout`` s until a server could bind ``port``; True if it could.

    A server that was just killed can keep its listening socket for a moment after its
    process is gone: the kernel finishes closing it asynchronously.
    """
    deadline = time.monotonic() + timeout
    while not port_free(port):
        if time.monotonic() >= deadline:
            return False
        time.sleep(_POLL_SECONDS)
    return True


def log_errors(path: Path, limit: int = 8) -> str:
    """Return the first error lines of a RabbitMQ log (the cause; what follows is the
    shutdown it triggered), or its last lines when it has none."""
    try:
        with path.open("rb") as handle:
            text = handle.read(4 * 1024 * 1024).decode("utf-8", errors="replace")
    except OSError:
        return f"(no log at {path})"
    errors = [line for line in text.splitlines() if "[error]" in line][:limit]
    if not errors:
        return log_tail(path)
    return f"first error lines of {path}:\n" + "\n".join(f"  {line}" for line in errors)


def log_tail(path: Path, lines: int = 15) -> str:
    """Return the last ``lines`` lines of a server's log file, for an error message."""
    try:
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - 16384))
            data = handle.read()
    except OSError:
        return f"(no log at {path})"
    tail = data.decode("utf-8", errors="replace").splitlines()[-lines:]
    return f"last lines of {path}:\n" + "\n".join(f"  {line}" for line in tail)
