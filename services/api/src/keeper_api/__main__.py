"""``python -m keeper_api``: serve the API and the console with uvicorn (settings from
``KEEPER_API_*``). SIGTERM or SIGINT: stop taking requests, finish those in flight, wait
a bounded time for running operations' replies, close the bus and Redis, exit 0 (as the
other services do)."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections.abc import Iterator

import uvicorn
from pydantic import ValidationError

from keeper_api.app import create_app
from keeper_api.settings import ApiSettings


class _Server(uvicorn.Server):
    """uvicorn's server, except that a stop signal ends it with exit 0: uvicorn's own
    handler re-raises the signal once shut down, so the process would end killed by it."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        loop = asyncio.get_running_loop()
        for stop in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(stop, self.handle_exit, stop, None)
        try:
            yield
        finally:
            for stop in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(stop)


def main() -> int:
    try:
        settings = ApiSettings()  # the required fields come from the environment
    except ValidationError as error:
        print(f"keeper_api: bad settings: {error}", file=sys.stderr)
        return 2
    config = uvicorn.Config(
        create_app(settings),
        host=settings.listen_host,
        port=settings.listen_port,
        timeout_graceful_shutdown=30,
        log_level="info",
        access_log=False,
    )
    asyncio.run(_Server(config).serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
