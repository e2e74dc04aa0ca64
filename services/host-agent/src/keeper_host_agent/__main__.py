"""`python -m keeper_host_agent`: run one host agent until SIGTERM;
`python -m keeper_host_agent install-hook`: install libvirt's QEMU hook (see hook.install)."""

from __future__ import annotations

import functools
import sys

from keeper_host_agent.app import serve
from keeper_host_agent.hook import install
from keeper_host_agent.settings import HostAgentSettings
from keeper_shared.runtime.logging import configure_logging
from keeper_shared.runtime.service_runner import run_until_signalled


def main() -> None:
    """Build settings and logging once, then serve (or install the hook, when asked)."""
    if sys.argv[1:2] == ["install-hook"]:
        install.main(sys.argv[2:])
        return
    settings = HostAgentSettings()
    configure_logging(
        f"host-agent/{settings.host_id}", json_output=settings.log_json, level=settings.log_level
    )
    run_until_signalled(functools.partial(serve, settings))


if __name__ == "__main__":
    main()
