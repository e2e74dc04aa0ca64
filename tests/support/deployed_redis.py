"""Redis servers started from the files in ``deploy/redis/``, as an operator would start
them, on free ports in a test's directory (the ``start_deployed_redis`` fixture in
``tests/conftest.py``)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

from keeper_devtools.localstack import RedisConfig, RedisServer, free_tcp_ports

DEPLOY_REDIS = Path(__file__).resolve().parents[2] / "deploy" / "redis"
INSTALLED_DIR = "/etc/redis/"
"""Where the deploy files expect each other (``include /etc/redis/redis.conf``)."""


class StartRedis(Protocol):
    """Start one server from ``deploy/redis/<name>`` and wait until it answers."""

    def __call__(
        self,
        name: str,
        *,
        replica_of: int | None = None,
        extra_args: tuple[str, ...] = (),
        login: tuple[str, str] | None = None,
    ) -> RedisServer: ...


def installed_copy(name: str, into: Path) -> Path:
    """``deploy/redis/<name>`` with its includes pointing at this repository's files
    instead of ``/etc/redis/``: otherwise the file exactly as shipped."""
    text = (DEPLOY_REDIS / name).read_text(encoding="utf-8")
    lines = [
        f"include {DEPLOY_REDIS}/{line.removeprefix('include ' + INSTALLED_DIR)}"
        if line.startswith(f"include {INSTALLED_DIR}")
        else line
        for line in text.splitlines()
    ]
    into.mkdir(parents=True, exist_ok=True)
    copy = into / name
    copy.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return copy


@contextmanager
def deployed_redis_servers(base_dir: Path) -> Iterator[StartRedis]:
    """A function starting one server from a deploy file per call (the options are
    ``RedisConfig``'s); all are stopped at the end."""
    started: list[RedisServer] = []

    def start(
        name: str,
        *,
        replica_of: int | None = None,
        extra_args: tuple[str, ...] = (),
        login: tuple[str, str] | None = None,
    ) -> RedisServer:
        (port,) = free_tcp_ports(1)
        directory = base_dir / f"redis-{len(started) + 1}"
        server = RedisServer(
            RedisConfig(
                port=port,
                base_dir=directory,
                replica_of=replica_of,
                config_file=installed_copy(name, directory),
                extra_args=extra_args,
                login=login,
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
