"""The local stack really starts a usable broker and a durable Redis, and stops them."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from pathlib import Path

import aio_pika
import pytest
import redis
from aio_pika.exceptions import ChannelPreconditionFailed

from keeper_devtools.localstack import RedisServer, free_tcp_ports
from keeper_devtools.localstack._process import port_open, wait_port_free


@pytest.mark.rabbit
async def test_rabbitmq_quorum_queue_round_trip(rabbitmq_url: str) -> None:
    connection = await aio_pika.connect(rabbitmq_url)
    async with connection:
        channel = await connection.channel()  # publisher confirms are on by default
        name = f"test-localstack-{uuid.uuid4()}"
        queue = await channel.declare_queue(
            name, durable=True, arguments={"x-queue-type": "quorum", "x-delivery-limit": 3}
        )
        await channel.default_exchange.publish(
            aio_pika.Message(b"hello", delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
            routing_key=name,
        )
        async with asyncio.timeout(10), queue.iterator() as messages:
            async for message in messages:
                async with message.process():
                    assert message.body == b"hello"
                break

        # The broker refuses to redeclare the queue as another type: proof it is quorum.
        other_channel = await connection.channel()
        with pytest.raises(ChannelPreconditionFailed):
            await other_channel.declare_queue(name, durable=True)

        await queue.delete(if_unused=False, if_empty=False)


@pytest.mark.redis
def test_redis_writes_every_command_to_the_aof(redis_url: str) -> None:
    with redis.Redis.from_url(redis_url, decode_responses=True) as client:
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        assert client.config_get("appendfsync") == {"appendfsync": "always"}


@pytest.mark.redis
def test_redis_acknowledged_writes_survive_sigkill(private_redis_server: RedisServer) -> None:
    expected = {f"key:{i}": f"value:{i}" for i in range(200)}
    with redis.Redis.from_url(private_redis_server.url, decode_responses=True) as client:
        for key, value in expected.items():
            client.set(key, value)

    private_redis_server.kill()
    assert not private_redis_server.is_running()
    private_redis_server.start()

    with redis.Redis.from_url(private_redis_server.url, decode_responses=True) as client:
        assert client.mget(list(expected)) == list(expected.values())


@pytest.mark.rabbit
@pytest.mark.redis
@pytest.mark.usefixtures("local_servers_installed")
def test_cli_start_status_stop(tmp_path: Path) -> None:
    """Start, status, the tools run against the stack, and a stop that leaves nothing it
    started running: the node's own epmd included."""
    amqp_port, dist_port, epmd_port, redis_port = free_tcp_ports(4)
    env = {
        **os.environ,
        "KEEPER_STACK_RUN_DIR": str(tmp_path / "stack"),
        "KEEPER_STACK_RABBITMQ_PORT": str(amqp_port),
        "KEEPER_STACK_RABBITMQ_DIST_PORT": str(dist_port),
        "KEEPER_STACK_RABBITMQ_EPMD_PORT": str(epmd_port),
        "KEEPER_STACK_RABBITMQ_NODE_NAME": f"keeper-clitest-{amqp_port}",
        "KEEPER_STACK_REDIS_PORT": str(redis_port),
    }

    def cli(*command: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "keeper_devtools.localstack", *command],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )

    try:
        started = cli("start")
        assert started.returncode == 0, started.stderr
        lines = started.stdout.splitlines()
        assert len(lines) == 2
        # TLS only, with the stack's own CA; the admin's Redis password is not shown.
        ca = tmp_path / "stack" / "tls" / "ca.pem"
        assert f"amqps://guest:***@127.0.0.1:{amqp_port}/?cafile={ca}" in lines[0]
        assert f"rediss://keeper-admin:***@127.0.0.1:{redis_port}/0?ssl_ca_certs={ca}" in lines[1]
        admin = (tmp_path / "stack" / "redis-users" / "keeper-admin.password").read_text()
        assert admin.strip() not in started.stdout
        assert all("started in" in line for line in lines)
        assert port_open(epmd_port)  # the node's own port mapper, not the shared one

        assert cli("status").returncode == 0
        queues = cli("rabbitmqctl", "list_queues", "--quiet")
        assert queues.returncode == 0, queues.stderr
        pong = cli("redis-cli", "ping")
        assert (pong.returncode, pong.stdout.strip()) == (0, "PONG")

        again = cli("start")
        assert again.returncode == 0, again.stderr
        assert all("already running" in line for line in again.stdout.splitlines())

        stopped = cli("stop")
        assert stopped.returncode == 0, stopped.stderr
        assert wait_port_free(epmd_port, timeout=10), "the stack's epmd outlived its stop"

        status = cli("status")
        assert status.returncode == 3
        assert all(" down " in line for line in status.stdout.splitlines())
    finally:
        cli("stop")  # nothing may outlive the test, whatever failed above
