"""Lost hosts: declared after missing heartbeats, fenced by placing their VMs elsewhere,
and told to clean up, never to write, when they come back.

Every replica checks periodically; the alive -> lost transition is one atomic script, so
exactly one replica handles each loss. A host's clean-up list holds the VMs it must remove
without retrieving them: those placed on it when it was lost, and those whose stop could not
confirm the undefine. A VM on the list is removed when the host reports it while it is
placed elsewhere (or nowhere); if the VM was not moved meanwhile it simply stays.

A VM is marked lost only if it is still placed on the host when the mark is written: a
placement undone meanwhile (its start never reached the host) records no loss, and one
undone after the mark takes the mark back (see placement/workflow.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from datetime import UTC, datetime

import structlog
from redis.asyncio import Redis

from keeper_policy.gateway import Gateway
from keeper_policy.hosts.registry import HostRegistry
from keeper_policy.storage.keys import cleanup_lock_key
from keeper_policy.storage.vm_registry import PolicyRegistry, UnknownVmError
from keeper_shared.messages.host import HostHeartbeat
from keeper_shared.messages.host_loss import HostLost, HostReturned
from keeper_shared.messages.placement import RecoveryPoint, VmEvicted

log = structlog.get_logger(__name__)


class HostLiveness:
    """Loss detection and returning-host clean-up for one replica."""

    def __init__(
        self,
        redis: Redis,
        registry: PolicyRegistry,
        hosts: HostRegistry,
        gateway: Gateway,
        *,
        lost_after_s: float,
        check_interval_s: float,
    ) -> None:
        self._redis = redis
        self._registry = registry
        self._hosts = hosts
        self._gateway = gateway
        self._lost_after_s = lost_after_s
        self._check_interval_s = check_interval_s
        self._evicting: set[tuple[str, str]] = set()

    async def check_forever(self) -> None:
        """Look for lost hosts every interval until cancelled."""
        while True:
            try:
                await self.check_once()
            except Exception as error:  # Redis or broker restarting: the next round retries
                log.warning("liveness check failed", reason=type(error).__name__)
            await asyncio.sleep(self._check_interval_s)

    async def check_once(self) -> list[str]:
        """Declare lost every host silent for too long; returns those this replica declared."""
        now = time.time()
        declared = []
        for host in await self._hosts.hosts():
            if host.lost_at is not None or now - host.last_seen <= self._lost_after_s:
                continue
            last_seen = await self._hosts.declare_lost(host.host, now, self._lost_after_s)
            if last_seen is not None:
                await self._handle_loss(host.host, last_seen, now)
                declared.append(host.host)
        return declared

    async def _handle_loss(self, host: str, last_seen: float, now: float) -> None:
        points: list[RecoveryPoint] = []
        vm_ids = await self._registry.vms_on(host)
        for vm_id in vm_ids:
            try:
                vm = await self._registry.vm(vm_id)
            except UnknownVmError:
                continue
            point = vm.recovery_point(now)
            if await self._registry.mark_lost(vm_id, host, point):
                points.append(point)
        await self._hosts.add_cleanup(host, vm_ids)
        await self._gateway.publish(
            HostLost(
                host=host,
                last_seen=datetime.fromtimestamp(last_seen, UTC),
                silent_for_s=now - last_seen,
                vms=points,
            ),
            host,
        )
        log.warning(
            "host declared lost", host=host, silent_for_s=round(now - last_seen, 1), vms=len(points)
        )

    async def on_heartbeat(self, beat: HostHeartbeat, returned_from: float | None) -> None:
        """After a heartbeat was recorded: announce a return, and have the host remove the
        VMs it must no longer hold."""
        reported = {entry.vm_id for entry in beat.vms}
        candidates = await self._hosts.cleanup_set(beat.host)
        if returned_from is not None:
            # Back from the dead: whatever vTPM Keeper placed on it and has placed elsewhere
            # since must go, even if the loss was never fully recorded (a replica died).
            candidates |= {entry.vm_id for entry in beat.vms if entry.epoch > 0}
        to_evict: list[str] = []
        settled: list[str] = []
        for vm_id in sorted(candidates):
            if vm_id not in reported:
                settled.append(vm_id)  # the host no longer holds it
                continue
            placement = await self._registry.placement(vm_id)
            if placement.epoch == 0 or placement.host == beat.host:
                # Never placed by us, never moved, or placed here again (which redefines
                # the domain): not something to remove.
                settled.append(vm_id)
            else:
                to_evict.append(vm_id)
        await self._hosts.drop_cleanup(beat.host, settled)
        if returned_from is not None:
            await self._gateway.publish(
                HostReturned(
                    host=beat.host,
                    lost_for_s=max(0.0, time.time() - returned_from),
                    to_clean_up=to_evict,
                ),
                beat.host,
            )
            log.info("lost host is back", host=beat.host, to_clean_up=len(to_evict))
        for vm_id in to_evict:
            await self._evict(beat.host, vm_id)

    async def _evict(self, host: str, vm_id: str) -> None:
        # One replica per VM at a time; the lock outlives one eviction's commands.
        if (host, vm_id) in self._evicting:
            return
        lock_ms = int(self._gateway.host_timeout_s * 2 * 1000) + 1000
        if not await self._redis.set(cleanup_lock_key(vm_id), host, nx=True, px=lock_ms):
            return
        self._evicting.add((host, vm_id))
        try:
            result = await self._gateway.evict(vm_id, host)
            if not result.ok:
                log.warning(
                    "eviction failed; retried on a later heartbeat",
                    vm_id=vm_id,
                    host=host,
                    reason=result.error,
                )
                return
            await self._hosts.drop_cleanup(host, [vm_id])
            placement = await self._registry.placement(vm_id)
            await self._gateway.publish(
                VmEvicted(vm_id=vm_id, host=host, placed_on=placement.host), vm_id
            )
            log.info("VM evicted from host", vm_id=vm_id, host=host, placed_on=placement.host)
        finally:
            self._evicting.discard((host, vm_id))
            with contextlib.suppress(Exception):
                await self._redis.delete(cleanup_lock_key(vm_id))
