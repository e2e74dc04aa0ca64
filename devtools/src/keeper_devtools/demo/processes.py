"""Starting the services as real processes and stopping them the way an operator would."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass
class ServiceProcess:
    """One service started with ``python -m <module>``, its output in ``log_path``."""

    name: str
    module: str
    env: dict[str, str]
    log_path: Path
    process: asyncio.subprocess.Process | None = None
    command_prefix: tuple[str, ...] = ()
    """Runs the service under this command, e.g. ``ip netns exec NAME`` (tests)."""

    async def start(self) -> None:
        """Start it, with stdout and stderr in its log file."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.process = await asyncio.create_subprocess_exec(
                *self.command_prefix,
                sys.executable,
                "-m",
                self.module,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env={**os.environ, **self.env},
                start_new_session=True,
            )

    @property
    def running(self) -> bool:
        """True while the process has not exited."""
        return self.process is not None and self.process.returncode is None

    async def stop(self, grace_s: float = 20.0) -> int | None:
        """SIGTERM, wait up to ``grace_s``, then SIGKILL; returns the exit code."""
        if self.process is None:
            return None
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), grace_s)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self.process.kill()
                await self.process.wait()
        return self.process.returncode
