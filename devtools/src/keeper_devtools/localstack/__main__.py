"""``python -m keeper_devtools.localstack start|stop|status``: the local stack by hand."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from typing import Protocol

from keeper_devtools.localstack.errors import LocalStackError
from keeper_devtools.localstack.settings import LocalStackSettings

EXIT_DOWN = 3  # LSB's "program is not running", so scripts can tell down from broken


class _Server(Protocol):
    def start(self) -> None: ...
    def stop(self) -> None: ...
    def is_running(self) -> bool: ...


def _servers(settings: LocalStackSettings) -> list[tuple[str, _Server, str]]:
    rabbit = settings.rabbitmq_node()
    redis = settings.redis_server()
    return [("rabbitmq", rabbit, rabbit.amqp_url), ("redis", redis, redis.url)]


def _start(settings: LocalStackSettings) -> int:
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
    return 0


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
    parser.add_argument("command", choices=["start", "stop", "status"])
    command = parser.parse_args(argv).command
    settings = LocalStackSettings()
    actions = {"start": _start, "stop": _stop, "status": _status}
    try:
        return actions[command](settings)
    except LocalStackError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
