"""`python -m keeper_host_agent`: run one host agent until SIGTERM."""

from __future__ import annotations

import functools

from keeper_host_agent.app import serve
from keeper_host_agent.settings import HostAgentSettings
from keeper_shared.runtime.logging import configure_logging
from keeper_shared.runtime.service_runner import run_until_signalled


def main() -> None:
    """Build settings and logging once, then serve."""
    settings = HostAgentSettings()
    configure_logging(
        f"host-agent/{settings.host_id}", json_output=settings.log_json, level=settings.log_level
    )
    run_until_signalled(functools.partial(serve, settings))


if __name__ == "__main__":
    main()
