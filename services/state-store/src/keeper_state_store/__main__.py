"""`python -m keeper_state_store`: run one state-store replica until SIGTERM."""

from __future__ import annotations

import functools

from keeper_shared.runtime.logging import configure_logging
from keeper_shared.runtime.service_runner import run_until_signalled
from keeper_state_store.app import serve
from keeper_state_store.settings import StateStoreSettings


def main() -> None:
    """Build settings and logging once, then serve."""
    settings = StateStoreSettings()
    configure_logging(
        f"state-store/{settings.replica_id}",
        json_output=settings.log_json,
        level=settings.log_level,
    )
    run_until_signalled(functools.partial(serve, settings))


if __name__ == "__main__":
    main()
