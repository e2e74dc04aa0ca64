"""``python -m keeper_devtools.localstack start|stop|status``: the local stack by hand;
``rabbitmqctl ARGS`` and ``redis-cli ARGS`` run those tools against it (the node's
cookie, epmd port and name; Redis's port), as ``deploy/local/stack`` does."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import yarl

from keeper_devtools.localstack import _process
from keeper_devtools.localstack.errors import LocalStackError
from keeper_devtools.localstack.redis_users import ADMIN
from keeper_devtools.localstack.settings import LocalStackSettings

EXIT_DOWN = 3  # LSB's "program is not running", so scripts can tell down from broken


class _Server(Protocol):
    def start(self) -> None: ...
    def stop(self) -> None: ...
    def is_running(self) -> bool: ...


def _shown(url: str) -> str:
    """``url`` with its password masked (the admin's Redis password is not for a screen)."""
    parsed = yarl.URL(url)
    return str(parsed.with_password("***")) if parsed.password else url


def _servers(settings: LocalStackSettings) -> list[tuple[str, _Server, str]]:
    rabbit = settings.rabbitmq_node()
    redis = settings.redis_server()
    return [("rabbitmq", rabbit, _shown(rabbit.amqp_url)), ("redis", redis, _shown(redis.url))]


def _start(settings: LocalStackSettings) -> int:
    settings.prepare()
    for label, server, url in _servers(settings):
        if server.is_running():
            print(f"{label:<8} up    {url}  (already running)")
            continue
        began = time.monotonic()
        server.start()
        print(f"{label:<8} up    {url}  (started in {time.monotonic() - began:.1f} s)")
    return 0


def _stop(settings: LocalStackSettings) -> int:
    for label, server, _url in _servers(settings):
        if not server.is_running():
            server.stop()  # still tidies up a half-started process or a stale pid file
            print(f"{label:<8} down  (was not running)")
            continue
        began = time.monotonic()
        server.stop()
        print(f"{label:<8} down  (stopped in {time.monotonic() - began:.1f} s)")
    # Stopping the node stops its epmd; one left by a node that died is stopped here.
    settings.rabbitmq_node().stop_own_epmd()
    print(f"{'epmd':<8} down  (port {settings.rabbitmq_epmd_port})")
    return 0


def _rabbitmqctl(settings: LocalStackSettings, arguments: list[str]) -> int:
    node = settings.rabbitmq_node()
    ctl = _process.find_binary("rabbitmqctl", Path("/usr/lib/rabbitmq/bin"))
    command = [ctl, "-n", node.config.node, *arguments]
    return subprocess.run(command, env=node.ctl_environment(), check=False).returncode


def _redis_cli(settings: LocalStackSettings, arguments: list[str]) -> int:
    cli = _process.find_binary("redis-cli")
    user, password = settings.redis_users.login(ADMIN)
    command = [cli, "-h", "127.0.0.1", "-p", str(settings.redis_port)]
    command += ["--tls", "--cacert", str(settings.tls.ca), "--user", user, *arguments]
    # redis-cli reads the password from REDISCLI_AUTH, so it is not on its command line.
    environment = {**os.environ, "REDISCLI_AUTH": password}
    return subprocess.run(command, env=environment, check=False).returncode


def _status(settings: LocalStackSettings) -> int:
    all_up = True
    for label, server, url in _servers(settings):
        up = server.is_running()
        all_up = all_up and up
        print(f"{label:<8} {'up  ' if up else 'down'}  {url}")
    return 0 if all_up else EXIT_DOWN


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command against the stack described by ``KEEPER_STACK_*``; return the exit
    code (``status``: 0 when both servers are up, 3 otherwise; errors: 1)."""
    parser = argparse.ArgumentParser(
        prog="python -m keeper_devtools.localstack",
        description="Start, stop or check the private RabbitMQ node and Redis server.",
    )
    parser.add_argument("command", choices=["start", "stop", "status", "rabbitmqctl", "redis-cli"])
    parser.add_argument(
        "arguments", nargs=argparse.REMAINDER, help="for rabbitmqctl and redis-cli: theirs"
    )
    parsed = parser.parse_args(argv)
    settings = LocalStackSettings()
    actions = {"start": _start, "stop": _stop, "status": _status}
    tools = {"rabbitmqctl": _rabbitmqctl, "redis-cli": _redis_cli}
    try:
        if parsed.command in tools:
            return tools[parsed.command](settings, parsed.arguments)
        if parsed.arguments:
            parser.error(f"{parsed.command} takes no arguments")
        return actions[parsed.command](settings)
    except LocalStackError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
