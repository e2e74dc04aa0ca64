"""Redis servers started from the files in ``deploy/redis/``, as an operator would start
them, on free ports in a test's directory (the ``start_deployed_redis`` fixture in
``tests/conftest.py``).

The files expect what an operator installs beside them in ``/etc/redis/``: the CA and the
server's certificate (``tls/``), the ACL users (``users.acl``) and the replication
password (``masterauth.conf``). The test's copy puts the session's certificates and users
in a directory of its own and points the files there: otherwise they are as shipped."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

from keeper_devtools.localstack import RedisConfig, RedisServer, free_tcp_ports
from keeper_devtools.localstack.redis_users import RedisUsers
from keeper_devtools.tls import TlsFiles

DEPLOY_REDIS = Path(__file__).resolve().parents[2] / "deploy" / "redis"
INSTALLED_DIR = "/etc/redis/"
"""Where the deploy files expect each other and what is installed beside them."""
DEPLOY_FILES = ("redis.conf", "replicated.conf", "cluster.conf")


class StartRedis(Protocol):
    """Start one server from ``deploy/redis/<name>`` and wait until it answers."""

    def __call__(
        self, name: str, *, replica_of: int | None = None, extra_args: tuple[str, ...] = ()
    ) -> RedisServer: ...


def install(into: Path, tls: TlsFiles, users: RedisUsers) -> Path:
    """An ``/etc/redis/`` of the test's own in ``into``: the deploy files with every
    ``/etc/redis/`` path pointing there, the certificates and the users' files."""
    into.mkdir(parents=True, exist_ok=True)
    for name in DEPLOY_FILES:
        text = (DEPLOY_REDIS / name).read_text(encoding="utf-8")
        (into / name).write_text(text.replace(INSTALLED_DIR, f"{into}/"), encoding="utf-8")
    (into / "tls").mkdir(mode=0o700, exist_ok=True)
    for source, target in (
        (tls.ca, "ca.pem"),
        (tls.server_cert, "server.pem"),
        (tls.server_key, "server.key"),
    ):
        shutil.copy2(source, into / "tls" / target)
    shutil.copy2(users.acl_file, into / "users.acl")
    shutil.copy2(users.masterauth_file, into / "masterauth.conf")
    return into


@contextmanager
def deployed_redis_servers(
    base_dir: Path, tls: TlsFiles, users: RedisUsers
) -> Iterator[StartRedis]:
    """A function starting one server from a deploy file per call (the options are
    ``RedisConfig``'s); all are stopped at the end."""
    etc = install(base_dir / "etc-redis", tls, users)
    started: list[RedisServer] = []

    def start(
        name: str, *, replica_of: int | None = None, extra_args: tuple[str, ...] = ()
    ) -> RedisServer:
        (port,) = free_tcp_ports(1)
        server = RedisServer(
            RedisConfig(
                port=port,
                base_dir=base_dir / f"redis-{len(started) + 1}",
                replica_of=replica_of,
                config_file=etc / name,
                extra_args=extra_args,
                # What the clients use; the server takes its own from the file.
                tls=tls,
                users=users,
            )
        )
        started.append(server)
        server.start()
        return server

    try:
        yield start
    finally:
        for server in reversed(started):
            server.stop()
