"""A service given several broker URLs connects to the first that answers."""

from __future__ import annotations

from typing import cast

import aio_pika
import pytest

from keeper_shared.bus.client import BusClient
from keeper_shared.localstack import free_tcp_ports

pytestmark = [pytest.mark.rabbit]


async def test_the_first_node_that_answers_is_used(rabbitmq_url: str) -> None:
    (closed_port,) = free_tcp_ports(1)
    dead = f"amqp://guest:guest@127.0.0.1:{closed_port}/"
    bus = await BusClient.connect([dead, rabbitmq_url], source="test/node-list", origin="test")
    try:
        connection = cast(aio_pika.RobustConnection, bus.connection)
        assert connection.url.port == int(rabbitmq_url.rsplit(":", 1)[1].strip("/"))
    finally:
        await bus.close()


async def test_no_node_answering_is_an_error() -> None:
    ports = free_tcp_ports(2)
    urls = [f"amqp://guest:guest@127.0.0.1:{port}/" for port in ports]
    with pytest.raises(ConnectionError):
        await BusClient.connect(urls, source="test/node-list", origin="test")
