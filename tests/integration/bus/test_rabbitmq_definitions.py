"""deploy/rabbitmq/definitions.json is what the topology generates, loads into a real
RabbitMQ node, and agrees with what the services declare; a host user is confined to its
own routing keys and command queue; an integrator or observer user to its own queues, and
the example integrator client works under one."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import aio_pika
import aio_pika.exceptions
import pytest
from aio_pika.abc import AbstractIncomingMessage

from keeper_devtools.contract.rabbitmq import (
    client_definitions,
    definitions,
    host_definitions,
    main,
    render,
)
from keeper_devtools.demo.processes import ServiceProcess
from keeper_devtools.localstack import (
    NotInstalledError,
    RabbitMQConfig,
    RabbitMQNode,
    free_tcp_ports,
)
from keeper_shared.bus import topology
from keeper_shared.bus.client import BusClient, Delivery, Route
from keeper_shared.keeper_client.client import client_origin
from keeper_shared.messages.commands import CommandOutcome
from keeper_shared.messages.envelope import Envelope, Payload
from support.waiting import wait_until


class _Ping(Payload):
    """A test event."""

    message_type: ClassVar[str] = "test.ping"


async def _ignore(message: AbstractIncomingMessage) -> None:
    del message


REPO = Path(__file__).resolve().parents[3]
COMMITTED = REPO / "deploy" / "rabbitmq" / "definitions.json"


def test_committed_definitions_are_generated_from_the_topology(tmp_path: Path) -> None:
    assert COMMITTED.read_text(encoding="utf-8") == render(definitions()), (
        "deploy/rabbitmq/definitions.json differs from keeper_shared.bus.topology: run "
        "`.venv/bin/python -m keeper_devtools.contract.rabbitmq definitions`"
    )
    stale = tmp_path / "definitions.json"
    stale.write_text("{}", encoding="utf-8")
    assert main(["definitions", "--check", "--output", str(stale)]) == 1


def test_a_bad_host_id_is_refused() -> None:
    with pytest.raises(ValueError, match="not a host id"):
        host_definitions("Host_A", "pw")


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitMQNode]:
    amqp_port, dist_port, epmd_port = free_tcp_ports(3)
    rabbit = RabbitMQNode(
        RabbitMQConfig(
            name=f"keeper-defs-{amqp_port}",
            amqp_port=amqp_port,
            dist_port=dist_port,
            epmd_port=epmd_port,
            base_dir=tmp_path_factory.mktemp("rabbitmq-defs"),
        )
    )
    try:
        rabbit.check_installed()
    except NotInstalledError as error:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(str(error))
        pytest.skip(str(error))
    try:
        rabbit.start()
        yield rabbit
    finally:
        rabbit.stop()


def _import(node: RabbitMQNode, document: dict[str, object], path: Path) -> None:
    path.write_text(json.dumps(document), encoding="utf-8")
    result = node.ctl("import_definitions", str(path))
    assert result is not None, "rabbitmqctl import_definitions timed out"
    assert result.returncode == 0, result.stdout + result.stderr


def _url(node: RabbitMQNode, user: str, password: str) -> str:
    return f"amqp://{user}:{password}@127.0.0.1:{node.config.amqp_port}/"


@pytest.mark.rabbit
async def test_definitions_load_and_agree_with_the_declarations(
    node: RabbitMQNode, tmp_path: Path
) -> None:
    _import(node, json.loads(COMMITTED.read_text(encoding="utf-8")), tmp_path / "defs.json")
    _import(node, host_definitions("host-a", "secret-a"), tmp_path / "host-a.json")
    listed = node.ctl("list_queues", "name", "type", "arguments")
    assert listed is not None
    assert listed.returncode == 0
    for spec in (topology.STATE_STORE_EVENTS, topology.POLICY_COMMANDS):
        assert spec.name in listed.stdout
        assert spec.dead_letter_queue in listed.stdout
    assert "keeper.host.host-a.commands" in listed.stdout

    # Redeclaring what the definitions created must not fail with PRECONDITION_FAILED.
    connection = await aio_pika.connect(node.amqp_url)
    try:
        channel = await connection.channel()
        for spec in (
            topology.STATE_STORE_EVENTS,
            topology.STATE_STORE_COMMANDS,
            topology.POLICY_EVENTS,
            topology.POLICY_COMMANDS,
            topology.host_command_queue("host-a"),
        ):
            await topology.declare_queue(channel, spec)
    finally:
        await connection.close()


@pytest.mark.rabbit
async def test_a_host_user_speaks_only_for_itself(node: RabbitMQNode, tmp_path: Path) -> None:
    _import(node, json.loads(COMMITTED.read_text(encoding="utf-8")), tmp_path / "defs.json")
    _import(node, host_definitions("host-b", "secret-b"), tmp_path / "host-b.json")
    _import(node, host_definitions("host-c", "secret-c"), tmp_path / "host-c.json")

    # As the host agent does: connect, declare, consume its queue, publish its events.
    bus = await BusClient.connect(
        _url(node, "host-b", "secret-b"), source="host-agent/host-b", origin="host-b"
    )
    try:
        consumer = await bus.consume(topology.host_command_queue("host-b"), [], prefetch=1)
        await bus.publish_event(_Ping(), subject="host-b")
        await consumer.stop(1.0)
    finally:
        await bus.close()

    connection = await aio_pika.connect(_url(node, "host-b", "secret-b"))
    try:
        channel = await connection.channel(publisher_confirms=True)
        events = await channel.get_exchange(topology.EVENTS_EXCHANGE, ensure=False)
        with pytest.raises(aio_pika.exceptions.ChannelClosed, match="ACCESS_REFUSED"):
            await events.publish(aio_pika.Message(b"{}"), routing_key="host.heartbeat.host-c")
        channel = await connection.channel()
        queue = await channel.get_queue("keeper.host.host-c.commands", ensure=False)
        with pytest.raises(aio_pika.exceptions.ChannelClosed, match="ACCESS_REFUSED"):
            await queue.consume(_ignore)
    finally:
        await connection.close()


@pytest.mark.rabbit
async def test_a_host_user_cannot_spoof_reach_or_read_what_is_not_its_own(
    node: RabbitMQNode, tmp_path: Path
) -> None:
    """Invariant 3 at the broker: besides another host's routing key and command queue
    (above), a host user can neither claim another user id, nor slip a message into a
    service's queue through the default exchange, nor read a service's queue."""
    _import(node, json.loads(COMMITTED.read_text(encoding="utf-8")), tmp_path / "defs.json")
    _import(node, host_definitions("host-d", "secret-d"), tmp_path / "host-d.json")
    connection = await aio_pika.connect(_url(node, "host-d", "secret-d"))
    try:
        channel = await connection.channel(publisher_confirms=True)
        events = await channel.get_exchange(topology.EVENTS_EXCHANGE, ensure=False)
        with pytest.raises(aio_pika.exceptions.ChannelClosed, match="PRECONDITION_FAILED"):
            await events.publish(
                aio_pika.Message(b"{}", user_id="host-e"), routing_key="host.heartbeat.host-d"
            )
        channel = await connection.channel(publisher_confirms=True)
        with pytest.raises(aio_pika.exceptions.ChannelClosed, match="ACCESS_REFUSED"):
            await channel.default_exchange.publish(
                aio_pika.Message(b"{}"), routing_key=topology.STATE_STORE_EVENTS.name
            )
        for spec in (topology.STATE_STORE_EVENTS, topology.POLICY_COMMANDS):
            channel = await connection.channel()
            queue = await channel.get_queue(spec.name, ensure=False)
            with pytest.raises(aio_pika.exceptions.ChannelClosed, match="ACCESS_REFUSED"):
                await queue.consume(_ignore)
            channel = await connection.channel()
            queue = await channel.get_queue(spec.name, ensure=False)
            with pytest.raises(aio_pika.exceptions.ChannelClosed, match="ACCESS_REFUSED"):
                await queue.get(fail=False)
    finally:
        await connection.close()


@pytest.mark.rabbit
async def test_a_host_user_replies_through_the_replies_exchange_and_reads_no_other_reply(
    node: RabbitMQNode, tmp_path: Path
) -> None:
    """Without the default exchange a host still answers commands; and it cannot bind its
    reply queue to another caller's replies (which may carry other hosts' state)."""
    _import(node, json.loads(COMMITTED.read_text(encoding="utf-8")), tmp_path / "defs.json")
    _import(node, host_definitions("host-f", "secret-f"), tmp_path / "host-f.json")

    class _Poke(Payload):
        """A test command."""

        message_type: ClassVar[str] = "test.poke"

    class _Poked(CommandOutcome):
        """Its reply."""

        message_type: ClassVar[str] = "test.poke.reply"

    async def answer(_envelope: Envelope[_Poke], _delivery: Delivery) -> _Poked:
        return _Poked(ok=True)

    host = await BusClient.connect(
        _url(node, "host-f", "secret-f"), source="host-agent/host-f", origin="host-f"
    )
    caller = await BusClient.connect(node.amqp_url, source="policy/test", origin="policy")
    try:
        await host.consume(
            topology.host_command_queue("host-f"), [Route(_Poke, answer)], prefetch=1
        )
        reply = await caller.call(
            topology.host_command_key("host-f"),
            _Poke(),
            _Poked,
            subject="host-f",
            timeout_s=30,
            replier="host-f",
        )
        assert reply.data.ok

        channel = await host.connection.channel()
        own = await channel.declare_queue(
            topology.reply_queue_name("host-f", "00ff"), exclusive=True, auto_delete=True
        )
        with pytest.raises(aio_pika.exceptions.ChannelClosed, match="ACCESS_REFUSED"):
            await own.bind(
                topology.REPLIES_EXCHANGE, routing_key=topology.reply_queue_name("policy", "00ff")
            )
    finally:
        await caller.close()
        await host.close()


def test_a_bad_client_user_name_is_refused() -> None:
    with pytest.raises(ValueError, match="not a user name"):
        client_definitions("Auto_1", "pw", commands=True)


@pytest.mark.rabbit
@pytest.mark.redis
async def test_the_example_integrator_client_works_with_an_integrator_user(
    node: RabbitMQNode, redis_url: str, tmp_path: Path
) -> None:
    """docs/integrating.md's promise: with the integrator user the generator makes and only
    aio-pika and docs/asyncapi.json, a client follows events, gets typed replies (each one
    the document names for its command, or the example exits non-zero) and learns at once
    why a command it got wrong was rejected."""
    _import(node, json.loads(COMMITTED.read_text(encoding="utf-8")), tmp_path / "defs.json")
    _import(node, client_definitions("auto-1", "secret-1", commands=True), tmp_path / "i.json")
    policy = ServiceProcess(
        "policy",
        "keeper_policy",
        {
            "KEEPER_POLICY_AMQP_URL": node.amqp_url,
            "KEEPER_POLICY_REDIS_URL": redis_url,
            "KEEPER_POLICY_LOG_JSON": "true",
        },
        tmp_path / "policy.log",
    )
    await policy.start()
    try:
        await wait_until(lambda: _ready(policy), "policy to be ready")
        example = await asyncio.create_subprocess_exec(
            sys.executable,
            str(REPO / "examples" / "integrator_client.py"),
            _url(node, "auto-1", "secret-1"),
            str(REPO / "docs" / "asyncapi.json"),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        async with asyncio.timeout(120):
            out, err = await example.communicate()
    finally:
        assert await policy.stop() == 0
    assert example.returncode == 0, err.decode()
    steps = {line["step"]: line for line in map(json.loads, out.decode().splitlines())}
    assert steps["tpm.enable"]["reply_type"] == "tpm.enable.reply"
    assert steps["event"]["type"] in {"tpm.approved", "tpm.rejected"}
    assert steps["vms.list"]["reply_type"] == "vms.listed"
    assert steps["invalid command"] == {
        "step": "invalid command",
        "reply_type": "command.rejected",
        "code": "invalid",
    }


async def _ready(service: ServiceProcess) -> bool:
    return service.is_ready()


@pytest.mark.rabbit
async def test_an_integrator_user_reaches_only_what_is_its_own(
    node: RabbitMQNode, tmp_path: Path
) -> None:
    """Least privilege: an integrator sends commands and reads events and its own replies;
    it cannot publish events, create or delete exchanges, read a service's queue or another
    caller's replies. An observer cannot even send commands."""
    _import(node, json.loads(COMMITTED.read_text(encoding="utf-8")), tmp_path / "defs.json")
    _import(node, client_definitions("auto-2", "secret-2", commands=True), tmp_path / "i.json")
    _import(node, client_definitions("watch-1", "secret-3", commands=False), tmp_path / "o.json")

    # The keeper's own client, as the CLI connects under such a user.
    bus = await BusClient.connect(
        _url(node, "auto-2", "secret-2"),
        source="client/test",
        origin=client_origin(_url(node, "auto-2", "secret-2")),
        declare_exchanges=False,
    )
    await bus.close()

    connection = await aio_pika.connect(_url(node, "auto-2", "secret-2"))
    try:
        channel = await connection.channel(publisher_confirms=True)
        events = await channel.get_exchange(topology.EVENTS_EXCHANGE, ensure=False)
        with pytest.raises(aio_pika.exceptions.ChannelClosed, match="ACCESS_REFUSED"):
            await events.publish(aio_pika.Message(b"{}"), routing_key="vm.stopped.host-a")
        channel = await connection.channel()
        with pytest.raises(aio_pika.exceptions.ChannelClosed, match="ACCESS_REFUSED"):
            await channel.declare_exchange(topology.EVENTS_EXCHANGE, "topic", durable=True)
        channel = await connection.channel()
        queue = await channel.get_queue(topology.POLICY_COMMANDS.name, ensure=False)
        with pytest.raises(aio_pika.exceptions.ChannelClosed, match="ACCESS_REFUSED"):
            await queue.get(fail=False)
        channel = await connection.channel()
        own = await channel.declare_queue(
            topology.reply_queue_name("auto-2", "00ff"), exclusive=True, auto_delete=True
        )
        with pytest.raises(aio_pika.exceptions.ChannelClosed, match="ACCESS_REFUSED"):
            await own.bind(
                topology.REPLIES_EXCHANGE, routing_key=topology.reply_queue_name("policy", "00ff")
            )
    finally:
        await connection.close()

    connection = await aio_pika.connect(_url(node, "watch-1", "secret-3"))
    try:
        channel = await connection.channel()
        mine = await channel.declare_queue(
            topology.client_queue_name("watch-1", "events"), exclusive=True, auto_delete=True
        )
        await mine.bind(topology.EVENTS_EXCHANGE, routing_key="state.persisted.*")
        channel = await connection.channel(publisher_confirms=True)
        commands = await channel.get_exchange(topology.COMMANDS_EXCHANGE, ensure=False)
        with pytest.raises(aio_pika.exceptions.ChannelClosed, match="ACCESS_REFUSED"):
            await commands.publish(aio_pika.Message(b"{}"), routing_key=topology.POLICY)
    finally:
        await connection.close()
