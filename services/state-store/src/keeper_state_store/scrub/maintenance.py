"""The store replica's background tasks: the scrubber and, at start, KEK rotation.

Neither blocks the replica: both run as tasks beside the consumers, and both stop when
the replica stops (the scrubber after the version it is on, within the shutdown grace).
"""

from __future__ import annotations

import asyncio

import structlog
from redis.asyncio import Redis

from keeper_shared.bus.client import BusClient
from keeper_state_store.crypto.key_ring import KeyRing
from keeper_state_store.crypto.key_rotation import rotate_data_keys
from keeper_state_store.scrub.scrubber import Scrubber
from keeper_state_store.settings import StateStoreSettings

log = structlog.get_logger(__name__)


class Maintenance:
    """Starts and stops the background tasks of one replica."""

    def __init__(
        self, settings: StateStoreSettings, redis: Redis, keys: KeyRing, bus: BusClient
    ) -> None:
        self._settings = settings
        self._redis = redis
        self._keys = keys
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._rotation: asyncio.Task[None] | None = None
        self.scrubber: Scrubber | None = None
        if settings.scrub_enabled:
            self.scrubber = Scrubber(
                redis,
                keys,
                bus.publish_event,
                versions_per_second=settings.scrub_versions_per_second,
                interval_s=settings.scrub_interval_s,
                pass_pause_s=settings.scrub_pass_pause_s,
                use_swtpm=settings.scrub_swtpm,
                temp_dir=settings.scrub_temp_dir,
            )

    def start(self) -> None:
        """Start rotation (if previous KEKs are configured) and the scrubber (if enabled)."""
        if self._settings.rewrap_on_start and len(self._keys.key_ids) > 1:
            self._rotation = asyncio.create_task(self._rotate(), name="kek-rotation")
            self._tasks.append(self._rotation)
        if self.scrubber is not None:
            self._tasks.append(asyncio.create_task(self.scrubber.run(self._stop), name="scrubber"))

    async def _rotate(self) -> None:
        try:
            report = await rotate_data_keys(self._redis, self._keys)
        except Exception as error:  # logged; the next start runs it again
            log.warning("data key rotation failed", error_type=type(error).__name__)
            return
        if not report.complete:
            log.warning(
                "data key rotation left records behind",
                unknown_kek_ids=sorted(report.unknown_kek),
                damaged=len(report.damaged),
            )

    async def close(self) -> None:
        """Stop the tasks: the scrubber finishes its version within the shutdown grace; a
        rotation is simply cancelled (every record it changed is complete, and the next run
        carries on where it stopped)."""
        self._stop.set()
        if self._rotation is not None:
            self._rotation.cancel()
        if not self._tasks:
            return
        _done, pending = await asyncio.wait(self._tasks, timeout=self._settings.shutdown_grace_s)
        for task in pending:
            task.cancel()
        for task in self._tasks:
            try:
                await task
            except asyncio.CancelledError:
                pass
            except Exception as error:
                log.warning(
                    "background task failed", task=task.get_name(), error_type=type(error).__name__
                )
        self._tasks.clear()
