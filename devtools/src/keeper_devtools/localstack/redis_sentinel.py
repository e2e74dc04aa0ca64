"""A Sentinel-managed Redis on one machine: a primary, one replica and three Sentinels.

Debian's ``redis-server`` binary runs as a Sentinel with ``--sentinel`` (the
``redis-sentinel`` package only adds a systemd unit and a symlink), so no other package is
needed.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

from keeper_devtools.localstack import _process
from keeper_devtools.localstack.errors import LocalStackError
from keeper_devtools.localstack.redis import RedisConfig, RedisServer
from keeper_devtools.localstack.redis_users import ADMIN, SENTINEL, RedisUsers
from keeper_devtools.tls import TlsFiles

_SENTINEL_COUNT = 3
_QUORUM = 2
"""Two of the three Sentinels must agree the primary is down; a majority must also elect
the one that runs the failover, so a single confused Sentinel can do nothing."""


def _ask(client: redis.Redis, *command: str) -> Any:
    """Run one command on the synchronous client (redis-py types its commands for both the
    synchronous and the asyncio client, and leaves SENTINEL subcommands untyped)."""
    return client.execute_command(*command)  # type: ignore[no-untyped-call]


def _client(
    port: int,
    tls: TlsFiles | None = None,
    login: tuple[str, str] | None = None,
    password: str | None = None,
) -> redis.Redis:
    """A client of a data node as ``login``, or of a Sentinel with its ``password``."""
    username, user_password = login or (None, password)
    password = user_password
    tls_options: dict[str, Any] = {} if tls is None else {"ssl": True, "ssl_ca_certs": str(tls.ca)}
    return redis.Redis(
        host="127.0.0.1",
        port=port,
        username=username,
        password=password,
        socket_timeout=2,
        socket_connect_timeout=1,
        decode_responses=True,
        **tls_options,
    )


def _sentinel_config(
    port: int, tls: TlsFiles | None, users: RedisUsers | None, master_name: str
) -> list[str]:
    """The lines that differ with TLS and ACL users: the Sentinel's listener, and how it
    logs in to the data nodes (the password only ever in this file)."""
    lines = (
        [f"port {port}"]
        if tls is None
        else [
            "port 0",
            f"tls-port {port}",
            f"tls-cert-file {tls.server_cert}",
            f"tls-key-file {tls.server_key}",
            f"tls-ca-cert-file {tls.ca}",
            "tls-auth-clients optional",
            # Sentinels reach the data nodes and each other over TLS.
            "tls-replication yes",
        ]
    )
    if users is not None:
        lines += [
            f"sentinel auth-user {master_name} {SENTINEL}",
            f"sentinel auth-pass {master_name} {users.password(SENTINEL)}",
            # Clients and the other Sentinels log in to this one with its own password.
            f"requirepass {users.sentinel_password}",
            f"sentinel sentinel-pass {users.sentinel_password}",
        ]
    return lines


class RedisSentinel:
    """One Sentinel process watching the group's primary; its state file is its config."""

    def __init__(
        self,
        port: int,
        base_dir: Path,
        *,
        tls: TlsFiles | None = None,
        users: RedisUsers | None = None,
    ) -> None:
        """Prepare to manage the Sentinel on ``port`` with its files in ``base_dir``; with
        ``tls`` it takes TLS only, with ``users`` it logs in to the data nodes as the
        Sentinel user."""
        self.port = port
        self._tls = tls
        self._users = users
        self._password = users.sentinel_password if users is not None else None
        self._base = base_dir.absolute()
        self._pid_file = self._base / "sentinel.pid"
        self._config_file = self._base / "sentinel.conf"
        self.log_file = self._base / "sentinel.log"

    def start(
        self, *, master_name: str, primary_port: int, down_after_ms: int, timeout: float = 15.0
    ) -> None:
        """Start the Sentinel monitoring ``primary_port`` and wait until it answers PING."""
        if self.is_running():
            return
        if not _process.wait_port_free(self.port):
            raise LocalStackError(f"port {self.port} on 127.0.0.1 is already in use")
        self._base.mkdir(parents=True, exist_ok=True)
        self._pid_file.unlink(missing_ok=True)
        # Sentinel rewrites this file with what it learns (replicas, peers, the current
        # primary), so it is written only once: a restarted Sentinel resumes from it.
        if not self._config_file.exists():
            listener = _sentinel_config(self.port, self._tls, self._users, master_name)
            _write_private(
                self._config_file,
                "\n".join(
                    [
                        *listener,
                        "bind 127.0.0.1",
                        f"dir {self._base}",
                        "daemonize yes",
                        f"pidfile {self._pid_file}",
                        f"logfile {self.log_file}",
                        f"sentinel monitor {master_name} 127.0.0.1 {primary_port} {_QUORUM}",
                        f"sentinel down-after-milliseconds {master_name} {down_after_ms}",
                        f"sentinel failover-timeout {master_name} {max(10 * down_after_ms, 10000)}",
                        f"sentinel parallel-syncs {master_name} 1",
                        "",
                    ]
                ),
            )
        binary = _process.find_binary("redis-server")
        launched = _process_run([binary, str(self._config_file), "--sentinel"], self._base)
        if launched != 0:
            raise LocalStackError(
                f"redis-server --sentinel exited with {launched} on port {self.port}; "
                f"{_process.log_tail(self.log_file)}"
            )
        deadline = time.monotonic() + timeout
        while not self.is_running():
            if time.monotonic() >= deadline:
                self.stop()
                raise LocalStackError(
                    f"Sentinel on port {self.port} did not answer within {timeout:.0f} s; "
                    f"{_process.log_tail(self.log_file)}"
                )
            time.sleep(0.05)

    def is_running(self) -> bool:
        """Tell whether the Sentinel's process is alive and answers PING."""
        if _process.live_pid(self._pid_file, "redis-server") is None:
            return False
        client = _client(self.port, self._tls, password=self._password)
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False
        finally:
            client.close()

    def stop(self) -> None:
        """Stop the Sentinel (SIGTERM, then SIGKILL); idempotent."""
        pid = _process.live_pid(self._pid_file, "redis-server")
        if pid is not None:
            _process.terminate(pid, grace=10.0)
        self._pid_file.unlink(missing_ok=True)


def _write_private(path: Path, text: str) -> None:
    """Write ``path`` readable by its owner only: it may hold the Sentinel's password."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as handle:
        handle.write(text)


def _process_run(command: list[str], cwd: Path) -> int:
    # Output to a file, not a pipe: the daemon would inherit a pipe and keep it open.
    with (cwd / "startup.out").open("ab") as out:
        return subprocess.run(
            command,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=30,
            check=False,
        ).returncode


class RedisSentinelGroup:
    """A primary, one replica and three Sentinels on free ports under ``base_dir``, AOF on
    (``appendfsync always``) on both data servers.

    The Sentinels fail the primary over to the replica when two of them have not heard from
    it for ``down_after_ms``; :meth:`kill_primary` and :meth:`wait_for_failover` drive that.
    """

    def __init__(
        self,
        base_dir: Path,
        *,
        master_name: str = "keeper",
        down_after_ms: int = 2000,
        tls: TlsFiles | None = None,
        users: RedisUsers | None = None,
    ):
        """Prepare the servers and Sentinels (nothing is started); with ``tls`` every link
        is TLS, with ``users`` the data nodes have the ACL users and ``default`` off."""
        self.master_name = master_name
        self.down_after_ms = down_after_ms
        self.tls = tls
        self.users = users
        primary_port, replica_port, *sentinel_ports = _process.free_tcp_ports(2 + _SENTINEL_COUNT)
        self.servers = [
            RedisServer(
                RedisConfig(port=primary_port, base_dir=base_dir / "primary", tls=tls, users=users)
            ),
            RedisServer(
                RedisConfig(
                    port=replica_port,
                    base_dir=base_dir / "replica",
                    replica_of=primary_port,
                    tls=tls,
                    users=users,
                )
            ),
        ]
        self.sentinels = [
            RedisSentinel(port, base_dir / f"sentinel-{index + 1}", tls=tls, users=users)
            for index, port in enumerate(sentinel_ports)
        ]

    @property
    def sentinel_addresses(self) -> list[str]:
        """``host:port`` of every Sentinel, as services take them."""
        return [f"127.0.0.1:{sentinel.port}" for sentinel in self.sentinels]

    def start(self, timeout: float = 60.0) -> None:
        """Start the primary, the replica (waiting until it has synced) and the Sentinels
        (waiting until each knows the replica and both other Sentinels)."""
        try:
            for server in self.servers:
                server.start()
            deadline = time.monotonic() + timeout
            self._wait(self._replica_in_sync, "the replica to sync with the primary", deadline)
            primary_port = self.servers[0].config.port
            for sentinel in self.sentinels:
                sentinel.start(
                    master_name=self.master_name,
                    primary_port=primary_port,
                    down_after_ms=self.down_after_ms,
                )
            self._wait(self._sentinels_agree, "the Sentinels to find each other", deadline)
        except BaseException:
            self.stop()
            raise

    def primary(self) -> RedisServer:
        """The server the Sentinels currently name as primary."""
        port = self._master_port()
        for server in self.servers:
            if server.config.port == port:
                return server
        raise LocalStackError(f"the Sentinels name an unknown primary on port {port}")

    def kill_primary(self) -> RedisServer:
        """SIGKILL the current primary, as a crash would; return it (for a later start)."""
        primary = self.primary()
        primary.kill()
        return primary

    def wait_for_failover(self, old_primary: RedisServer, timeout: float = 60.0) -> RedisServer:
        """Wait until the Sentinels name another primary and it accepts writes; return it."""
        deadline = time.monotonic() + timeout

        def promoted() -> bool:
            answer = self._ask_primary("ROLE")
            if answer is None:
                return False
            port, role = answer
            return port != old_primary.config.port and role[0] == "master"

        self._wait(promoted, "a Sentinel failover", deadline)
        return self.primary()

    def wait_for_replica(self, timeout: float = 60.0) -> None:
        """Wait until the current primary has a replica online (a returning old primary is
        turned into one by the Sentinels, which wait about 8 s before they do)."""
        deadline = time.monotonic() + timeout

        def replica_online() -> bool:
            answer = self._ask_primary("INFO", "replication")
            info = answer[1] if answer is not None else None
            replicas = [
                value
                for key, value in (info.items() if isinstance(info, dict) else [])
                if key.startswith("slave") and isinstance(value, dict)
            ]
            return any(replica.get("state") == "online" for replica in replicas)

        self._wait(replica_online, "a replica of the primary to come online", deadline)

    def stop(self) -> None:
        """Stop the Sentinels, then the servers; idempotent."""
        for sentinel in self.sentinels:
            sentinel.stop()
        for server in reversed(self.servers):
            server.stop()

    def _ask_primary(self, *command: str) -> tuple[int, Any] | None:
        """The port the Sentinels name as primary, and that server's answer to
        ``command``; None while the Sentinels or the server cannot be asked."""
        try:
            port = self._master_port()
        except LocalStackError:
            return None
        client = self._data_client(port)
        try:
            return port, _ask(client, *command)
        except redis.RedisError:
            return None
        finally:
            client.close()

    def _master_port(self) -> int:
        for sentinel in self.sentinels:
            client = self._sentinel_client(sentinel.port)
            try:
                address = _ask(client, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.master_name)
            except redis.RedisError:
                continue
            finally:
                client.close()
            if address:
                return int(address[1])
        raise LocalStackError(f"no Sentinel names a primary for {self.master_name}")

    def _replica_in_sync(self) -> bool:
        client = self._data_client(self.servers[1].config.port)
        try:
            info = _ask(client, "INFO", "replication")
        except redis.RedisError:
            return False
        finally:
            client.close()
        # redis-py parses INFO into a dict.
        return isinstance(info, dict) and info.get("master_link_status") == "up"

    def _sentinels_agree(self) -> bool:
        for sentinel in self.sentinels:
            client = self._sentinel_client(sentinel.port)
            try:
                replicas = _ask(client, "SENTINEL", "REPLICAS", self.master_name)
                peers = _ask(client, "SENTINEL", "SENTINELS", self.master_name)
            except redis.RedisError:
                return False
            finally:
                client.close()
            if len(replicas) != 1 or len(peers) != _SENTINEL_COUNT - 1:
                return False
        return True

    @property
    def sentinel_password(self) -> str | None:
        """The Sentinels' password (None: they take none)."""
        return self.users.sentinel_password if self.users is not None else None

    def _sentinel_client(self, port: int) -> redis.Redis:
        return _client(port, self.tls, password=self.sentinel_password)

    def _data_client(self, port: int) -> redis.Redis:
        return _client(port, self.tls, self.users.login(ADMIN) if self.users else None)

    @staticmethod
    def _wait(condition: Callable[[], bool], what: str, deadline: float) -> None:
        while not condition():
            if time.monotonic() >= deadline:
                raise LocalStackError(f"timed out waiting for {what}")
            time.sleep(0.1)
