"""Starting the services as real processes and stopping them the way an operator would."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

READY_EVENTS = {
    "keeper_state_store": "state store ready",
    "keeper_policy": "policy ready",
    "keeper_host_agent": "host agent ready",
}
"""The line each service logs once it serves (``keeper_shared.runtime.service_runner``)."""


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

    def log_records(self, *, from_offset: int = 0) -> list[dict[str, Any]]:
        """The JSON records the service logged, from byte ``from_offset`` of its log on
        (a restarted service appends to the same file); other lines are skipped."""
        try:
            with self.log_path.open("rb") as log:
                log.seek(from_offset)
                text = log.read().decode("utf-8", errors="replace")
        except FileNotFoundError:
            return []
        records = []
        for line in text.splitlines():
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if isinstance(record, dict):
                    records.append(record)
        return records

    def logged_events(self, *, from_offset: int = 0) -> list[str]:
        """The ``event`` of every record the service logged (see :meth:`log_records`)."""
        return [str(record.get("event")) for record in self.log_records(from_offset=from_offset)]

    def is_ready(self, *, from_offset: int = 0) -> bool:
        """Whether the service logged its ready line (since ``from_offset``)."""
        return READY_EVENTS[self.module] in self.logged_events(from_offset=from_offset)

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
