"""Builds and serves the host agent: the bus, libvirt, the start-up probe and view, the
command queue and the background loops, until told to stop."""

from __future__ import annotations

import asyncio

import structlog

from keeper_host_agent.agent import HostAgent
from keeper_host_agent.hook.server import HookServer
from keeper_host_agent.hypervisor.capabilities import probe_capabilities
from keeper_host_agent.settings import HostAgentSettings
from keeper_shared.bus.topology import host_command_queue
from keeper_shared.runtime.background import BackgroundTasks
from keeper_shared.runtime.service_runner import ServiceStartup, Serving, serve_on_bus

log = structlog.get_logger(__name__)


async def serve(settings: HostAgentSettings, stop: asyncio.Event) -> None:
    """Run the host agent until ``stop`` is set."""
    structlog.contextvars.bind_contextvars(host=settings.host_id)

    async def set_up(startup: ServiceStartup) -> Serving:
        agent = HostAgent(settings, startup.bus)
        agent.hypervisor.open(agent.on_lifecycle, on_reconnect=agent.rebuild_view)
        # After the bus closed (last registered runs first): the watcher, then libvirt.
        startup.after_bus_closes.callback(agent.hypervisor.close)
        startup.after_bus_closes.callback(agent.watcher.close)
        startup.before_bus_closes.push_async_callback(agent.announcer.close)
        capabilities = await probe_capabilities(
            await agent.hypervisor.library_version(),
            tpm_secrets=await agent.hypervisor.keeps_secrets(),
            capabilities_xml=await agent.hypervisor.capabilities_xml(),
        )
        agent.tracker.swtpm_version = capabilities.swtpm_version
        await agent.rebuild_view()
        commands = host_command_queue(settings.host_id)
        await startup.bus.consume(commands, agent.routes(), prefetch=8)
        if settings.hook_socket is not None:
            hook_server = HookServer(settings.hook_socket, agent.hook.handle)
            await hook_server.start()
            startup.before_bus_closes.push_async_callback(hook_server.close)
        loops = BackgroundTasks("host agent loop failed")
        loops.spawn(agent.watcher.watch_inotify(), name="inotify")
        loops.spawn(agent.watcher.rescan_periodically(), name="rescan")
        loops.spawn(agent.heartbeat_forever(capabilities), name="heartbeat")
        # Before the announcer's last flush: nothing announces or beats after it.
        startup.before_bus_closes.push_async_callback(loops.cancel_all)
        startup.before_bus_closes.push_async_callback(agent.lifecycle_tasks.cancel_all)
        return Serving(
            dead_letter_queues=[commands.dead_letter_queue],
            ready_fields={"libvirt_uri": settings.libvirt_uri, "vms": len(agent.tracker.vms)},
        )

    await serve_on_bus(
        stop,
        set_up,
        name="host agent",
        amqp_endpoints=settings.amqp_endpoints,
        source=f"host-agent/{settings.host_id}",
        origin=settings.host_id,
        grace_s=settings.shutdown_grace_s,
    )
    log.info("stopped")
