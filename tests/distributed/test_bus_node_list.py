"""A service given several broker URLs connects to the first that answers, and leaves a
node that drops it for the next one that answers, with its consumers restored there."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from typing import Any, cast

import aio_pika
import pytest
import yarl

from chaos.tcp_proxy import TcpProxy
from keeper_devtools.localstack import free_tcp_ports
from keeper_shared.bus.client import BusClient, Delivery, Route
from keeper_shared.bus.topology import QueueSpec, event_routing_key
from keeper_shared.messages.envelope import Envelope
from keeper_shared.messages.state import StatePersisted
from keeper_shared.messages.types import FencingToken, StateKind

pytestmark = [pytest.mark.rabbit]


async def test_the_first_node_that_answers_is_used(rabbitmq_url: str) -> None:
    (closed_port,) = free_tcp_ports(1)
    dead = f"amqp://guest:guest@127.0.0.1:{closed_port}/"
    bus = await BusClient.connect([dead, rabbitmq_url], source="test/node-list", origin="test")
    try:
        connection = cast(aio_pika.RobustConnection, bus.connection)
        assert connection.url.port == yarl.URL(rabbitmq_url).port
    finally:
        await bus.close()


async def test_no_node_answering_is_an_error() -> None:
    ports = free_tcp_ports(2)
    urls = [f"amqp://guest:guest@127.0.0.1:{port}/" for port in ports]
    with pytest.raises(ConnectionError):
        await BusClient.connect(urls, source="test/node-list", origin="test")


async def test_a_lost_node_is_left_for_the_next_that_answers_with_consumers_restored(
    rabbitmq_url: str,
) -> None:
    live = yarl.URL(rabbitmq_url)
    assert live.port is not None
    assert live.host is not None
    proxy = TcpProxy(live.host, live.port)
    await proxy.start()
    (closed_port,) = free_tcp_ports(1)
    # The node in use will drop out, and the next in the list does not answer at all.
    urls = [str(live.with_port(port)) for port in (proxy.port, closed_port, live.port)]
    origin = f"node-list-{uuid.uuid4().hex[:8]}"
    spec = QueueSpec(
        name=f"keeper.test.{origin}",
        event_bindings=(event_routing_key(StatePersisted.message_type, origin),),
        delivery_limit=2,
    )
    received: asyncio.Queue[str] = asyncio.Queue()

    async def on_persisted(envelope: Envelope[Any], _delivery: Delivery) -> None:
        await received.put(envelope.subject)

    bus = await BusClient.connect(urls, source="test/node-list", origin=origin)
    publisher = await BusClient.connect(rabbitmq_url, source="test/node-list-pub", origin=origin)
    try:
        await bus.consume(spec, [Route(StatePersisted, on_persisted)], prefetch=1)
        proxy.cut()
        after_cut = str(uuid.uuid4())
        async with asyncio.timeout(30):  # generous: a hang fails, slowness does not
            while True:
                await publisher.publish_event(_persisted(after_cut), subject=after_cut)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(1):
                        if await received.get() == after_cut:
                            break
        connection = cast(aio_pika.RobustConnection, bus.connection)
        assert connection.url.port == live.port
    finally:
        await bus.close()
        await publisher.close()
        await proxy.close()
        await _delete_queues(rabbitmq_url, [spec.name, spec.dead_letter_queue])


def _persisted(vm_id: str) -> StatePersisted:
    return StatePersisted(
        vm_id=vm_id,
        kind=StateKind.TPM,
        content_hash="0" * 64,
        size=0,
        token=FencingToken(epoch=1, generation=1),
        version=1,
        host="node-list",
    )


async def _delete_queues(url: str, names: list[str]) -> None:
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        for name in names:
            # Quorum queues: if_unused or if_empty make the broker close the connection.
            await channel.queue_delete(name, if_unused=False, if_empty=False)
