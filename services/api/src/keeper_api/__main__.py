"""``python -m keeper_api``: serve the API and the console with uvicorn (settings from
``KEEPER_API_*``). SIGTERM or SIGINT: stop taking requests, finish those in flight, wait
a bounded time for running operations' replies, close the bus and Redis, then end by the
signal (uvicorn re-raises it once shut down, which systemd counts as a clean stop)."""

from __future__ import annotations

import sys

import uvicorn
from pydantic import ValidationError

from keeper_api.app import create_app
from keeper_api.settings import ApiSettings


def main() -> int:
    try:
        settings = ApiSettings()  # the required fields come from the environment
    except ValidationError as error:
        print(f"keeper_api: bad settings: {error}", file=sys.stderr)
        return 2
    uvicorn.run(
        create_app(settings),
        host=settings.listen_host,
        port=settings.listen_port,
        timeout_graceful_shutdown=30,
        log_level="info",
        access_log=False,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
