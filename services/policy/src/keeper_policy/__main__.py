"""`python -m keeper_policy`: run one policy replica until SIGTERM."""

from __future__ import annotations

import functools

from keeper_policy.app import serve
from keeper_policy.settings import PolicySettings
from keeper_shared.runtime.logging import configure_logging
from keeper_shared.runtime.service_runner import run_until_signalled


def main() -> None:
    """Build settings and logging once, then serve."""
    settings = PolicySettings()
    configure_logging("policy", json_output=settings.log_json, level=settings.log_level)
    run_until_signalled(functools.partial(serve, settings))


if __name__ == "__main__":
    main()
