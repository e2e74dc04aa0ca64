"""A private Redis server with the append-only file on, started from Debian's package."""

from __future__ import annotations

import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import redis

from keeper_devtools.localstack import _process
from keeper_devtools.localstack.errors import LocalStackError
from keeper_devtools.localstack.redis_users import ADMIN, REPLICATION, RedisUsers
from keeper_devtools.tls import TlsFiles

# Redis rewrites its process title to "redis-server 127.0.0.1:<port>", so this is what a
# live server's command line holds.
_MARKER = "redis-server"


@dataclass(frozen=True)
class RedisConfig:
    """Where a private Redis server lives: its port and its directory."""

    port: int
    base_dir: Path
    replica_of: int | None = None
    """Port of the primary on 127.0.0.1 this server replicates; None for a primary."""
    config_file: Path | None = None
    """A configuration file to start from (``deploy/redis/redis.conf``): it then says how
    the server persists, and only the address, directory and process files are set here."""
    extra_args: tuple[str, ...] = ()
    """More options for the command line, after all others (``--aclfile PATH``)."""
    login: tuple[str, str] | None = None
    """User and password to check the server with, when its ``default`` user is off
    (with ``users``: the admin user's by default)."""
    tls: TlsFiles | None = None
    """Certificates: the server then takes TLS only on ``port`` (a client certificate is
    optional, but one that is given must be signed by ``tls.ca``) and replicates over TLS.
    With ``config_file``, that file names the certificates; only the port is set here."""
    users: RedisUsers | None = None
    """The ACL users (``default`` off): the server reads ``users.acl`` and, as a replica,
    logs in to its primary as the replication user (the password from an included file).
    With ``config_file``, that file names the ACL file instead."""


class RedisServer:
    """Starts, checks, stops and kills one private Redis server.

    The server listens on 127.0.0.1 only and writes every acknowledged write to its
    append-only file before answering (``appendfsync always``); RDB snapshots are off
    (started from ``config.config_file``, that file says how it persists instead).
    Its AOF, log and pid file live in ``config.base_dir``.
    """

    def __init__(self, config: RedisConfig) -> None:
        """Prepare to manage the server described by ``config`` (nothing is started)."""
        self.config = config
        # Absolute, because redis-server runs from base_dir and resolves paths from there.
        self._base = config.base_dir.absolute()
        self._pid_file = self._base / "redis.pid"
        self._startup_out = self._base / "startup.out"
        self.log_file = self._base / "redis.log"

    @property
    def url(self) -> str:
        """The URL of database 0 on the server, as the admin user when it has ACL users."""
        users = self.config.users
        return self.url_for(*(users.login(ADMIN) if users else (None, None)))

    def url_for(self, user: str | None, password: str | None, database: int = 0) -> str:
        """The URL of ``database`` as ``user`` (None: the ``default`` user), with TLS
        ``rediss`` and the CA to verify the server with (redis-py reads ``ssl_ca_certs``)."""
        login = f"{user}:{password}@" if user is not None else ""
        address = f"{login}127.0.0.1:{self.config.port}/{database}"
        tls = self.config.tls
        if tls is None:
            return f"redis://{address}"
        return f"rediss://{address}?ssl_ca_certs={tls.ca}"

    @staticmethod
    def check_installed() -> None:
        """Raise NotInstalledError when redis-server is missing."""
        _process.find_binary("redis-server")

    def is_running(self) -> bool:
        """Tell whether the server's process is alive and answers PING."""
        return self.pid() is not None and self._answers_ping()

    def start(self, timeout: float = 15.0) -> None:
        """Start the server and wait until it answers PING; a running server is kept.

        Raises LocalStackError when the package is missing, the port is taken by something
        else, or the server does not answer within ``timeout`` seconds (it is then killed).
        """
        if self.is_running():
            return
        binary = _process.find_binary("redis-server")
        if self.pid() is None:
            self._launch(binary)
        deadline = time.monotonic() + timeout
        while not self.is_running():
            if self._died_after_launch():
                raise LocalStackError(
                    f"Redis on port {self.config.port} exited while starting; "
                    f"{_process.log_tail(self.log_file)}"
                )
            if time.monotonic() >= deadline:
                self._kill_leftover()
                raise LocalStackError(
                    f"Redis on port {self.config.port} did not answer within {timeout:.0f} s; "
                    f"{_process.log_tail(self.log_file)}"
                )
            time.sleep(0.05)

    def stop(self, timeout: float = 30.0) -> None:
        """Shut the server down cleanly (SIGTERM flushes the AOF); idempotent."""
        pid = self.pid()
        if pid is not None:
            _process.terminate(pid, grace=timeout)
        self._pid_file.unlink(missing_ok=True)

    def kill(self) -> None:
        """SIGKILL the server, as a crash would, and wait until it is gone.

        The pid file stays behind, as after a real crash; ``start`` copes with it.
        """
        pid = self.pid()
        if pid is None:
            return
        _process.send_signal(pid, signal.SIGKILL)
        if not _process.wait_gone(pid, 10.0):
            raise LocalStackError(f"Redis process {pid} survived SIGKILL")

    def pid(self) -> int | None:
        """The server's process id while it runs (None when it does not)."""
        return _process.live_pid(self._pid_file, _MARKER)

    def _died_after_launch(self) -> bool:
        # The daemonized server writes its pid file early (start removed any stale one); a
        # pid file whose process is gone means it failed (bad option, unreadable AOF) and
        # waiting longer is pointless. No command-line marker here: the server rewrites its
        # command line into a process title right after writing the pid file, and a read in
        # between can see it empty.
        pid = _process.read_pid(self._pid_file)
        return pid is not None and not _process.process_exists(pid)

    def _answers_ping(self) -> bool:
        users = self.config.users
        username, password = self.config.login or (users.login(ADMIN) if users else (None, None))
        client = redis.Redis.from_url(
            self.url_for(username, password), socket_timeout=1, socket_connect_timeout=1
        )
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False
        finally:
            client.close()

    def _launch(self, binary: str) -> None:
        if not _process.wait_port_free(self.config.port):
            raise LocalStackError(
                f"port {self.config.port} on 127.0.0.1 is already in use by another process; "
                "choose another port for Redis"
            )
        base = self._base
        base.mkdir(parents=True, exist_ok=True)
        self._pid_file.unlink(missing_ok=True)
        command = [binary, *self.launch_arguments()]
        with self._startup_out.open("ab") as out:
            # A file, not a pipe: the daemon would inherit a pipe and keep it open.
            launched = subprocess.run(
                command,
                cwd=base,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=30,
                check=False,
            )
        if launched.returncode != 0:
            raise LocalStackError(
                f"redis-server exited with {launched.returncode} on port {self.config.port}; "
                f"{_process.log_tail(self._startup_out)}"
            )

    def launch_arguments(self) -> list[str]:
        """The arguments ``redis-server`` is started with: paths and settings, never a
        password (those are in the ACL file and the included files it names)."""
        command: list[str] = []
        if self.config.config_file is not None:
            command.append(str(self.config.config_file.absolute()))
        command += [*self._port_args(), *self._access_args()]
        command += [
            "--bind", "127.0.0.1",
            "--dir", str(self._base),
            "--daemonize", "yes",
            "--pidfile", str(self._pid_file),
            "--logfile", str(self.log_file),
        ]  # fmt: skip
        if self.config.config_file is None:
            command += ["--appendonly", "yes", "--appendfsync", "always", "--save", ""]
        if self.config.replica_of is not None:
            command += ["--replicaof", "127.0.0.1", str(self.config.replica_of)]
        # A replica that (re)joins gets its copy at once, instead of after the 5 s Redis
        # waits by default for other replicas to share the transfer.
        command += ["--repl-diskless-sync-delay", "0", *self.config.extra_args]
        return command

    def _port_args(self) -> list[str]:
        port = str(self.config.port)
        return ["--port", port] if self.config.tls is None else ["--port", "0", "--tls-port", port]

    def _access_args(self) -> list[str]:
        """Certificates and users (only paths: no password is ever on the command line)."""
        tls, users = self.config.tls, self.config.users
        args: list[str] = []
        if tls is not None and self.config.config_file is None:
            args += [
                "--tls-cert-file", str(tls.server_cert),
                "--tls-key-file", str(tls.server_key),
                "--tls-ca-cert-file", str(tls.ca),
                "--tls-auth-clients", "optional",
                "--tls-replication", "yes",
            ]  # fmt: skip
        if users is not None and self.config.config_file is None:
            # A primary too: after a failover it may be told to replicate the new one.
            args += ["--aclfile", str(users.acl_file), "--masteruser", REPLICATION]
            args += ["--include", str(users.masterauth_file)]
        return args

    def _kill_leftover(self) -> None:
        pid = self.pid()
        if pid is not None:
            _process.terminate(pid, grace=10.0)
        self._pid_file.unlink(missing_ok=True)
