"""A service whose broker connection is lost while it sets up its queues comes up anyway
(seen in a distributed chaos run: a policy replica reached a node, the node was killed
during ``queue.bind``, and the replica exited with "Server connection reset").

Each service runs as a real process whose AMQP URL points at a TCP proxy; the proxy cuts
every connection the moment the service sends one chosen declaration (the n-th
``Queue.Bind``, ``Basic.Qos`` ...) and refuses new ones until the service has tried again,
then heals. The service must then serve, without having exited: it answers a command (or
its heartbeat arrives), and its queues have exactly one consumer (nothing left over from
the attempt that failed). The test's own connections go straight to the broker.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
import pytest_asyncio
import yarl
from aio_pika.abc import AbstractIncomingMessage

from chaos.tcp_proxy import TcpProxy, plain_url_through, upstream_tls_for
from keeper_devtools.demo.processes import READY_EVENTS, ServiceProcess
from keeper_shared.bus.client import BusClient
from keeper_shared.bus.topology import (
    EVENTS_EXCHANGE,
    POLICY,
    POLICY_COMMANDS,
    POLICY_EVENTS,
    STATE_STORE,
    STATE_STORE_COMMANDS,
    STATE_STORE_EVENTS,
    QueueSpec,
    event_routing_key,
    host_command_queue,
)
from keeper_shared.messages.host import HostHeartbeat
from keeper_shared.messages.placement import StopMode, StopVm
from keeper_shared.messages.replies import StopVmReply
from keeper_shared.messages.state import ListStateHistory, StateHistory
from support.bus_hygiene import purge_service_queues
from support.sealing_keys import host_key_environment, new_keys

pytestmark = [pytest.mark.rabbit, pytest.mark.redis]

TIMEOUT_S = 60.0
"""Generous: against hangs only."""

CUT_POINTS = [
    # The bus client's own channel: publisher confirms, exchanges, the reply queue.
    ("Confirm.Select", 1),
    ("Exchange.Declare", 1),
    ("Queue.Bind", 1),
    # The first consumer: its channel's QoS, its dead-letter queue, its queue, its start.
    ("Basic.Qos", 1),
    ("Queue.Declare", 2),
    ("Queue.Bind", 3),
    ("Basic.Consume", 2),
]
"""(AMQP method, occurrence) at which the connection is cut, in start-up order."""

SECOND_CONSUMER_CUT_POINTS = [("Basic.Qos", 2), ("Basic.Consume", 3)]
"""The store and policy start a second consumer (their commands queue)."""


def cut_point_id(cut_point: tuple[str, int]) -> str:
    """``Queue.Bind-3`` for the third ``Queue.Bind``."""
    return f"{cut_point[0]}-{cut_point[1]}"


async def until(condition: Callable[[], bool], service: ServiceProcess, what: str) -> None:
    """Wait until ``condition()``; fail if the service exits first."""
    async with asyncio.timeout(TIMEOUT_S):
        while not condition():
            assert service.running, (
                f"{service.name} exited before {what}: {service.logged_events()[-8:]}"
            )
            await asyncio.sleep(0.1)


def through(proxy: TcpProxy, url: str) -> str:
    """``url`` pointed at the proxy (plain AMQP: the proxy speaks TLS to the broker)."""
    return plain_url_through(proxy, url)


@pytest_asyncio.fixture
async def proxy(rabbitmq_url: str) -> AsyncIterator[TcpProxy]:
    """A proxy in front of the session's broker; it reads the AMQP methods, so it ends the
    broker's TLS and serves the service plain AMQP (on loopback)."""
    broker = yarl.URL(rabbitmq_url)
    assert broker.host is not None
    assert broker.port is not None
    tcp_proxy = TcpProxy(broker.host, broker.port, upstream_tls=upstream_tls_for(rabbitmq_url))
    await tcp_proxy.start()
    try:
        yield tcp_proxy
    finally:
        await tcp_proxy.close()


@pytest_asyncio.fixture
async def bus(rabbitmq_url: str) -> AsyncIterator[BusClient]:
    """The test's own client, straight to the broker (never cut)."""
    client = await BusClient.connect(rabbitmq_url, source="test/startup-loss", origin="test")
    try:
        yield client
    finally:
        await client.close()


@pytest_asyncio.fixture
async def empty_service_queues(rabbitmq_url: str) -> AsyncIterator[None]:
    """The store and policy consume the shared service queues: empty before and after."""
    await purge_service_queues(rabbitmq_url)
    try:
        yield
    finally:
        await purge_service_queues(rabbitmq_url)


async def consumer_count(bus: BusClient, spec: QueueSpec) -> int:
    """How many consumers ``spec``'s queue has now."""
    channel = await bus.connection.channel()
    try:
        queue = await channel.declare_queue(spec.name, passive=True)
        return int(queue.declaration_result.consumer_count or 0)
    finally:
        await channel.close()


async def comes_up_despite_the_cut(
    service: ServiceProcess,
    proxy: TcpProxy,
    cut_point: tuple[str, int],
    serves: Callable[[], Awaitable[None]],
) -> None:
    """Start ``service`` with the cut armed, heal once it tried again, prove it serves,
    and stop it (exit 0)."""
    ready = READY_EVENTS[service.module]
    proxy.cut_at_method(*cut_point)
    await service.start()
    try:
        await until(lambda: not proxy.cut_pending, service, f"the cut at {cut_point}")
        # Healed only once the service came back to a node that was not there.
        await until(lambda: proxy.refused > 0, service, "trying again")
        proxy.heal()
        await until(lambda: ready in service.logged_events(), service, f'"{ready}"')
        async with asyncio.timeout(TIMEOUT_S):
            await serves()
        # One connection: none left behind by the attempt that failed (a robust connection
        # nobody holds, reconnecting and restoring its channels on its own).
        assert proxy.connections == 1
        assert service.running, service.logged_events()[-8:]
        assert service.logged_events().count(ready) == 1
    finally:
        code = await service.stop(TIMEOUT_S)
    assert code == 0, service.logged_events()[-8:]


@pytest.mark.parametrize("cut_point", CUT_POINTS + SECOND_CONSUMER_CUT_POINTS, ids=cut_point_id)
async def test_a_store_comes_up_when_its_connection_is_cut_during_start_up(
    cut_point: tuple[str, int],
    proxy: TcpProxy,
    bus: BusClient,
    rabbitmq_url: str,
    redis_url: str,
    empty_service_queues: None,
    kek_file: Path,
    store_sealing_key_file: Path,
    tmp_path: Path,
) -> None:
    store = ServiceProcess(
        "store",
        "keeper_state_store",
        {
            "KEEPER_STORE_AMQP_URL": through(proxy, rabbitmq_url),
            "KEEPER_STORE_REDIS_URL": redis_url,
            "KEEPER_STORE_KEK_FILE": str(kek_file),
            "KEEPER_STORE_SEALING_KEY_FILE": str(store_sealing_key_file),
            "KEEPER_STORE_REPLICA_ID": "store-cut",
            "KEEPER_STORE_SCRUB_ENABLED": "false",
            "KEEPER_STORE_LOG_JSON": "true",
        },
        tmp_path / "store.log",
    )

    async def serves() -> None:
        vm_id = str(uuid.uuid4())
        reply = await bus.call(
            STATE_STORE, ListStateHistory(vm_id=vm_id), StateHistory, subject=vm_id, timeout_s=30
        )
        assert reply.data.vm_id == vm_id
        for spec in (STATE_STORE_EVENTS, STATE_STORE_COMMANDS):
            assert await consumer_count(bus, spec) == 1, spec.name

    await comes_up_despite_the_cut(store, proxy, cut_point, serves)


@pytest.mark.parametrize("cut_point", CUT_POINTS + SECOND_CONSUMER_CUT_POINTS, ids=cut_point_id)
async def test_a_policy_replica_comes_up_when_its_connection_is_cut_during_start_up(
    cut_point: tuple[str, int],
    proxy: TcpProxy,
    bus: BusClient,
    rabbitmq_url: str,
    redis_url: str,
    empty_service_queues: None,
    tmp_path: Path,
) -> None:
    policy = ServiceProcess(
        "policy",
        "keeper_policy",
        {
            "KEEPER_POLICY_AMQP_URL": through(proxy, rabbitmq_url),
            "KEEPER_POLICY_REDIS_URL": redis_url,
            "KEEPER_POLICY_LOG_JSON": "true",
        },
        tmp_path / "policy.log",
    )

    async def serves() -> None:
        vm_id = str(uuid.uuid4())
        reply = await bus.call(
            POLICY,
            StopVm(vm_id=vm_id, mode=StopMode.POWEROFF),
            StopVmReply,
            subject=vm_id,
            timeout_s=30,
        )
        assert not reply.data.ok  # an unknown VM: the answer is what matters
        for spec in (POLICY_EVENTS, POLICY_COMMANDS):
            assert await consumer_count(bus, spec) == 1, spec.name

    await comes_up_despite_the_cut(policy, proxy, cut_point, serves)


@pytest.mark.libvirt
@pytest.mark.parametrize("cut_point", CUT_POINTS, ids=cut_point_id)
async def test_a_host_agent_comes_up_when_its_connection_is_cut_during_start_up(
    cut_point: tuple[str, int],
    proxy: TcpProxy,
    bus: BusClient,
    rabbitmq_url: str,
    tmp_path: Path,
) -> None:
    host_id = f"host-cut-{uuid.uuid4().hex[:8]}"
    (tmp_path / "swtpm").mkdir()
    (tmp_path / "nvram").mkdir()
    node = tmp_path / "node.xml"
    node.write_text("<node>\n</node>\n")
    agent = ServiceProcess(
        "host agent",
        "keeper_host_agent",
        {
            "KEEPER_HOST_HOST_ID": host_id,
            "KEEPER_HOST_AMQP_URL": through(proxy, rabbitmq_url),
            "KEEPER_HOST_LIBVIRT_URI": f"test://{node}",
            "KEEPER_HOST_SWTPM_ROOT": str(tmp_path / "swtpm"),
            "KEEPER_HOST_NVRAM_DIR": str(tmp_path / "nvram"),
            **host_key_environment(tmp_path, new_keys().public),
            "KEEPER_HOST_HEARTBEAT_INTERVAL_S": "1",
            "KEEPER_HOST_SHUTDOWN_GRACE_S": "5",
            "KEEPER_HOST_LOG_JSON": "true",
        },
        tmp_path / "agent.log",
    )
    channel = await bus.connection.channel()
    beats = await channel.declare_queue(exclusive=True, auto_delete=True)
    await beats.bind(
        EVENTS_EXCHANGE, routing_key=event_routing_key(HostHeartbeat.message_type, host_id)
    )
    commands = host_command_queue(host_id)

    async def serves() -> None:
        beat: AbstractIncomingMessage | None = None
        while beat is None:
            beat = await beats.get(fail=False, no_ack=True)
            if beat is None:
                await asyncio.sleep(0.2)
        assert HostHeartbeat.message_type == beat.type
        assert await consumer_count(bus, commands) == 1

    try:
        await comes_up_despite_the_cut(agent, proxy, cut_point, serves)
    finally:
        await channel.queue_delete(commands.name)
        await channel.queue_delete(commands.dead_letter_queue)
        await channel.close()
