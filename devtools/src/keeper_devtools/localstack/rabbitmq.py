"""A private RabbitMQ node beside any system one, started from Debian's package."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import string
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from keeper_devtools.contract.rabbitmq import password_hash
from keeper_devtools.localstack import _process
from keeper_devtools.localstack.errors import LocalStackError
from keeper_devtools.tls import TlsFiles

# Debian's /usr/sbin wrappers cd to /var/lib/rabbitmq and, as root, `su` to the rabbitmq
# user, which resets HOME (so the Erlang cookie) and cannot reach a root-only directory
# such as pytest's tmp dirs; non-root they refuse outright. The upstream scripts behind
# them take every setting from the environment and run as the caller.
_DEBIAN_SCRIPTS_DIR = Path("/usr/lib/rabbitmq/bin")
_ERLANG_BIN_DIR = Path("/usr/lib/erlang/bin")


@dataclass(frozen=True)
class RabbitMQConfig:
    """Where a private node lives: node name (``<name>@localhost``), ports, directory."""

    name: str
    amqp_port: int
    dist_port: int
    base_dir: Path
    erlang_cookie: str | None = field(default=None, repr=False)
    """The Erlang cookie; nodes of one cluster share it. None: a random one of its own."""
    epmd_port: int | None = None
    """The port of an Erlang port mapper (epmd) of the node's own, which the node starts
    and :meth:`RabbitMQNode.stop` stops with it. None: the machine's shared epmd (4369),
    which other Erlang nodes may use too and is therefore left running. Nodes of one
    cluster must use the same one."""
    tls: TlsFiles | None = None
    """Certificates for AMQP over TLS: the node then listens with TLS only (``amqps``),
    verifies a client certificate when one is given (signed by ``tls.ca``) and still lets
    clients without one log in with their password. None: plain AMQP."""

    @property
    def node(self) -> str:
        """The Erlang node name, e.g. ``keeper@localhost``."""
        return f"{self.name}@localhost"


class RabbitMQNode:
    """Starts, checks and stops one private RabbitMQ node.

    All of the node's files (data, logs, pid file, its own Erlang cookie and empty config
    and plugin files, so nothing under /etc/rabbitmq applies) live in ``config.base_dir``.
    AMQP and Erlang distribution listen on 127.0.0.1 only. The node runs as the calling
    user.
    """

    def __init__(self, config: RabbitMQConfig) -> None:
        """Prepare to manage the node described by ``config`` (nothing is started)."""
        self.config = config
        # Absolute, because the scripts run from base_dir and the marker below must match.
        base = config.base_dir.absolute()
        self._base = base
        # The node name is not on the node's command line, but HOME is (as `-home <dir>`),
        # and it is unique per node because each node has its own base_dir.
        self._marker = f"-home\0{base}\0"
        self._pid_file = base / "rabbitmq.pid"
        self._log_dir = base / "log"
        self._mnesia_dir = base / "mnesia"
        self._startup_out = self._log_dir / "startup.out"
        self.log_file = self._log_dir / f"{config.node}.log"

    @property
    def amqp_url(self) -> str:
        """The AMQP URL of the node (guest is allowed because it connects over loopback);
        with TLS, ``amqps`` and the CA to verify the node with (aiormq reads ``cafile``)."""
        return self.url_for("guest", "guest")

    def url_for(self, user: str, password: str) -> str:
        """The node's AMQP URL as ``user``."""
        address = f"{user}:{password}@127.0.0.1:{self.config.amqp_port}/"
        tls = self.config.tls
        if tls is None:
            return f"amqp://{address}"
        return f"amqps://{address}?cafile={tls.ca}"

    @staticmethod
    def check_installed() -> None:
        """Raise NotInstalledError when rabbitmq-server or rabbitmqctl is missing."""
        _process.find_binary("rabbitmq-server", _DEBIAN_SCRIPTS_DIR)
        _process.find_binary("rabbitmqctl", _DEBIAN_SCRIPTS_DIR)

    def is_running(self) -> bool:
        """Tell whether the node's process is alive and its AMQP port accepts connections."""
        return self.pid() is not None and _process.port_open(self.config.amqp_port)

    def start(self, timeout: float = 60.0) -> None:
        """Start the node and wait until RabbitMQ is fully booted; a running node is kept.

        Raises LocalStackError when the package is missing, a port is taken by something
        else, or the node does not come up within ``timeout`` seconds (it is then stopped).
        """
        if self.is_running():
            return
        server = _process.find_binary("rabbitmq-server", _DEBIAN_SCRIPTS_DIR)
        if self.pid() is None:
            self._check_ports_free()
            self._prepare_files()
            self._pid_file.unlink(missing_ok=True)
            with self._startup_out.open("ab") as out:
                # Output goes to a file, not a pipe: the detached node would inherit a pipe
                # and keep it open.
                launched = subprocess.run(
                    [server, "-detached"],
                    env=self._env(),
                    cwd=self._base,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    timeout=60,
                    check=False,
                )
            if launched.returncode != 0:
                raise LocalStackError(
                    f"rabbitmq-server -detached exited with {launched.returncode} for node "
                    f"{self.config.node}; {_process.log_tail(self._startup_out)}"
                )
        began = time.monotonic()
        waited = self._ctl(
            "wait", str(self._pid_file), "--timeout", str(int(timeout)), timeout=timeout
        )
        if waited is None or waited.returncode != 0 or not self.is_running():
            self._kill_leftover()
            said = "" if waited is None else (waited.stdout + waited.stderr).strip()[-1000:]
            raise LocalStackError(
                f"RabbitMQ node {self.config.node} did not come up (gave up after "
                f"{time.monotonic() - began:.0f} s of {timeout:.0f} s; rabbitmqctl wait said: "
                f"{said or 'nothing'}); {_process.log_errors(self.log_file)}"
            )

    def stop(self, timeout: float = 60.0) -> None:
        """Stop the node cleanly (rabbitmqctl stop), killing it if that fails; idempotent."""
        pid = self.pid()
        if pid is None:
            self._pid_file.unlink(missing_ok=True)
            return
        # `rabbitmqctl stop <pidfile>` waits forever for a pid file that is missing, so it is
        # only asked while the node's process is known to be alive; without rabbitmqctl the
        # signals sent by _kill_leftover still stop the node.
        with contextlib.suppress(LocalStackError):
            self._ctl("stop", str(self._pid_file), timeout=timeout)
        self._kill_leftover()
        self.stop_own_epmd()

    def stop_own_epmd(self) -> bool:
        """Stop the node's own epmd (``epmd_port``) once no node is registered with it;
        True when one was stopped. The shared epmd (no ``epmd_port``) is never touched:
        another RabbitMQ may rely on it."""
        port = self.config.epmd_port
        if port is None or not _process.port_open(port):
            return False
        epmd = _process.find_binary("epmd", _ERLANG_BIN_DIR)
        names = self._epmd(epmd, "-names")
        if names is None or " at port " in names:
            return False  # still in use (or not answering): not ours to stop now
        self._epmd(epmd, "-kill")
        return _process.wait_port_free(port)

    def _epmd(self, epmd: str, command: str) -> str | None:
        assert self.config.epmd_port is not None
        try:
            done = subprocess.run(
                [epmd, "-port", str(self.config.epmd_port), command],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=10,
                check=False,
            )
        except subprocess.TimeoutExpired:
            return None
        return done.stdout if done.returncode == 0 else None

    def kill(self) -> None:
        """SIGKILL the node, as a crash would, and wait until it is gone; ``start`` brings
        it back with its data (a clustered node rejoins its cluster)."""
        pid = self.pid()
        if pid is None:
            return
        _process.send_signal(pid, signal.SIGKILL)
        if not _process.wait_gone(pid, 10.0):
            raise LocalStackError(f"RabbitMQ node {self.config.node} survived SIGKILL")
        self._pid_file.unlink(missing_ok=True)

    def add_user(
        self,
        name: str,
        password: str,
        *,
        configure: str = ".*",
        write: str = ".*",
        read: str = ".*",
    ) -> None:
        """Create (or reset) a user on the default vhost with these permission regexes.

        Per-host users are how a host's messages get a broker-validated identity. The
        password never reaches a command line (rabbitmqctl 3.10 takes it only as an
        argument): the user is imported from a definitions file holding its hash.
        """
        self.import_user_definitions(
            {
                "users": [
                    {
                        "name": name,
                        "password_hash": password_hash(password),
                        "hashing_algorithm": "rabbit_password_hashing_sha256",
                        "tags": [],
                    }
                ],
                "permissions": [
                    {
                        "user": name,
                        "vhost": "/",
                        "configure": configure,
                        "write": write,
                        "read": read,
                    }
                ],
            }
        )

    def import_user_definitions(self, document: dict[str, Any]) -> None:
        """Create (or reset) the users ``document`` defines, with their permissions and
        anything else it holds (``keeper_devtools.contract.rabbitmq`` makes such documents
        for a host or a client). Passwords travel as hashes in a 0600 file, never in argv."""
        definitions = self._base / f"user-{secrets.token_hex(8)}.json"
        fd = os.open(definitions, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(document, handle)
        names = [user["name"] for user in document.get("users", [])]
        try:
            for name in names:
                self._ctl("delete_user", name, timeout=30.0)
            result = self._ctl("import_definitions", str(definitions), timeout=30.0)
        finally:
            definitions.unlink(missing_ok=True)
        if result is None or result.returncode != 0:
            detail = result.stderr.strip()[-300:] if result else "timed out"
            raise LocalStackError(
                f"rabbitmqctl import_definitions for {', '.join(names)} failed: {detail}"
            )

    def pid(self) -> int | None:
        """The server's process id while it runs (None when it does not)."""
        return _process.live_pid(self._pid_file, self._marker)

    def _kill_leftover(self) -> None:
        pid = self.pid()
        if pid is not None:
            _process.terminate(pid, grace=30.0)
        self._pid_file.unlink(missing_ok=True)

    def _check_ports_free(self) -> None:
        for port in (self.config.amqp_port, self.config.dist_port):
            if not _process.wait_port_free(port):
                raise LocalStackError(
                    f"port {port} on 127.0.0.1 is already in use by another process; "
                    f"choose other ports for RabbitMQ node {self.config.node}"
                )

    def _prepare_files(self) -> None:
        base = self._base
        for directory in (base, self._log_dir, self._mnesia_dir):
            directory.mkdir(parents=True, exist_ok=True)
        (base / "enabled_plugins").write_text("[].\n", encoding="ascii")
        (base / "rabbitmq.conf").write_text(self._config_text(), encoding="utf-8")
        (base / "advanced.config").write_text("[].\n", encoding="ascii")
        (base / "rabbitmq-env.conf").write_text("", encoding="ascii")
        cookie = base / ".erlang.cookie"
        if not cookie.exists():
            # Erlang refuses a cookie file that others can read; creating it before the first
            # start means the node and rabbitmqctl can never race to create two.
            value = self.config.erlang_cookie or "".join(
                secrets.choice(string.ascii_uppercase) for _ in range(32)
            )
            fd = os.open(cookie, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
            with os.fdopen(fd, "w", encoding="ascii") as handle:
                handle.write(value)

    def _config_text(self) -> str:
        tls = self.config.tls
        if tls is None:
            return "# Private node: settings come from the environment.\n"
        # The plain listener is off: a client without TLS is refused at the TCP level.
        # verify_peer with fail_if_no_peer_cert false: a client certificate is optional, but
        # one that is given must be signed by the CA (else the handshake fails).
        return "\n".join(
            [
                "# Private node: AMQP over TLS only; the rest comes from the environment.",
                "listeners.tcp = none",
                f"listeners.ssl.default = 127.0.0.1:{self.config.amqp_port}",
                f"ssl_options.cacertfile = {tls.ca}",
                f"ssl_options.certfile = {tls.server_cert}",
                f"ssl_options.keyfile = {tls.server_key}",
                "ssl_options.verify = verify_peer",
                "ssl_options.fail_if_no_peer_cert = false",
                "ssl_options.versions.1 = tlsv1.3",
                "ssl_options.versions.2 = tlsv1.2",
                "",
            ]
        )

    def _env(self) -> dict[str, str]:
        base = self._base
        # A caller's own RABBITMQ_* settings would leak into the private node.
        env = {k: v for k, v in os.environ.items() if not k.startswith("RABBITMQ_")}
        env.update(
            HOME=str(base),
            RABBITMQ_NODENAME=self.config.node,
            RABBITMQ_DIST_PORT=str(self.config.dist_port),
            RABBITMQ_MNESIA_BASE=str(self._mnesia_dir),
            RABBITMQ_LOG_BASE=str(self._log_dir),
            RABBITMQ_PID_FILE=str(self._pid_file),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(base / "enabled_plugins"),
            RABBITMQ_CONFIG_FILE=str(base / "rabbitmq.conf"),
            RABBITMQ_ADVANCED_CONFIG_FILE=str(base / "advanced.config"),
            RABBITMQ_CONF_ENV_FILE=str(base / "rabbitmq-env.conf"),
            RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}",
            # rabbitmqctl's own Erlang distribution listens on a fixed 35672-35682 unless
            # told otherwise, and would take a node's AMQP port there while it boots;
            # 0 lets the kernel pick a free port.
            RABBITMQ_CTL_DIST_PORT_MIN="0",
            RABBITMQ_CTL_DIST_PORT_MAX="0",
            ERL_CRASH_DUMP=str(self._log_dir / "erl_crash.dump"),
        )
        if self.config.tls is None:
            # With TLS the listener is in rabbitmq.conf; these would add a plain one.
            env.update(
                RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
                RABBITMQ_NODE_PORT=str(self.config.amqp_port),
            )
        # The node starts an epmd when none answers on this port, and registers there;
        # rabbitmqctl must look on the same port to find the node.
        env.pop("ERL_EPMD_PORT", None)
        if self.config.epmd_port is not None:
            env["ERL_EPMD_PORT"] = str(self.config.epmd_port)
        return env

    def ctl_environment(self) -> dict[str, str]:
        """The environment in which ``rabbitmqctl -n <node>`` reaches this node (its
        cookie is in its HOME, its epmd on its port), for a person at a shell."""
        return self._env()

    def ctl(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str] | None:
        """Run ``rabbitmqctl <args>`` against this node (e.g. ``import_definitions FILE``);
        None when it did not finish in time."""
        return self._ctl(*args, timeout=timeout)

    def _ctl(self, *args: str, timeout: float) -> subprocess.CompletedProcess[str] | None:
        """Run rabbitmqctl against this node; None when it did not finish in time."""
        ctl = _process.find_binary("rabbitmqctl", _DEBIAN_SCRIPTS_DIR)
        try:
            return subprocess.run(
                [ctl, "-n", self.config.node, *args],
                env=self._env(),
                cwd=self._base,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                # The CLI itself needs a few seconds to boot its own Erlang VM.
                timeout=timeout + 30,
                check=False,
            )
        except subprocess.TimeoutExpired:
            return None
