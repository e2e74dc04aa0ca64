"""Builds and serves the host agent: the bus, libvirt, the start-up probe and view, the
command queue and the background loops, until told to stop."""

from __future__ import annotations

import asyncio
import contextlib

import structlog

from keeper_host_agent.agent import HostAgent
from keeper_host_agent.hypervisor.capabilities import probe_capabilities
from keeper_host_agent.settings import HostAgentSettings
from keeper_shared.bus.client import BusClient
from keeper_shared.bus.topology import host_command_queue
from keeper_shared.observability import observe_service
from keeper_shared.runtime.startup import StoppedWhileWaitingError

log = structlog.get_logger(__name__)


async def serve(settings: HostAgentSettings, stop: asyncio.Event) -> None:
    """Run the host agent until ``stop`` is set."""
    structlog.contextvars.bind_contextvars(host=settings.host_id)
    try:
        bus = await BusClient.connect_when_up(
            settings.amqp_endpoints,
            source=f"host-agent/{settings.host_id}",
            origin=settings.host_id,
            stop=stop,
        )
    except StoppedWhileWaitingError:
        return
    agent = HostAgent(settings, bus)
    agent.hypervisor.open(agent.on_lifecycle, on_reconnect=agent.rebuild_view)
    background: list[asyncio.Task[None]] = []
    try:
        capabilities = await probe_capabilities(
            await agent.hypervisor.library_version(),
            tpm_secrets=await agent.hypervisor.keeps_secrets(),
        )
        agent.tracker.swtpm_version = capabilities.swtpm_version
        await agent.rebuild_view()
        await bus.consume(host_command_queue(settings.host_id), agent.routes(), prefetch=8)
        commands = host_command_queue(settings.host_id)
        background = [
            asyncio.create_task(agent.watcher.watch_inotify()),
            asyncio.create_task(agent.watcher.rescan_periodically()),
            asyncio.create_task(agent.heartbeat_forever(capabilities)),
        ]
        async with observe_service(bus, [commands.dead_letter_queue]):
            log.info(
                "host agent ready", libvirt_uri=settings.libvirt_uri, vms=len(agent.tracker.vms)
            )
            await stop.wait()
            log.info("stopping")
    finally:
        for task in background:
            task.cancel()
        for task in background:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await agent.announcer.close()
        await bus.close(settings.shutdown_grace_s)
        agent.watcher.close()
        agent.hypervisor.close()
        log.info("stopped")
