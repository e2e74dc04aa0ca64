"""A minimal integrator of vTPM Keeper, written from docs/asyncapi.json and docs/integrating.md
with nothing but aio-pika: no keeper package.

It connects as an integrator user (`python -m keeper_devtools.contract.rabbitmq integrator
NAME`), follows events on its own queue, asks policy to approve a TPM for a new VM (the reply
says whether it was approved and why not), lists the VMs policy knows, and sends a command
policy cannot decode to show the `command.rejected` answer. Each reply must be one the
document names for its command. One JSON line per step on stdout.

    python examples/integrator_client.py amqp://NAME:PASSWORD@rabbitmq:5672/ docs/asyncapi.json
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aio_pika
import yarl
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage

COMMANDS_EXCHANGE = "keeper.commands"
EVENTS_EXCHANGE = "keeper.events"
REPLIES_EXCHANGE = "keeper.replies"
POLICY = "policy"  # the routing key of policy's commands (channel keeper.policy.commands)
TIMEOUT_S = 30.0


class Contract:
    """What this client reads from the AsyncAPI 3.0 document: each message's schema version,
    and the replies each command may get."""

    def __init__(self, document: dict[str, Any]) -> None:
        self._document = document
        self._messages = {
            message["name"]: message for message in document["components"]["messages"].values()
        }

    def schema_version(self, message_type: str) -> int:
        payload = self._messages[message_type]["payload"]
        return int(payload["properties"]["schema_version"]["const"])

    def _resolve(self, node: dict[str, Any]) -> dict[str, Any]:
        """Follow ``$ref`` pointers (a channel's message refers to a component) to the object."""
        while "$ref" in node:
            target: Any = self._document
            for part in node["$ref"].removeprefix("#/").split("/"):
                target = target[part]
            node = target
        return node

    def reply_types(self, message_type: str) -> set[str]:
        """The types of the replies a command may get: the operation that receives it names
        its reply and the error reply."""
        for operation in self._document["operations"].values():
            received = {self._resolve(ref)["name"] for ref in operation["messages"]}
            if operation["action"] == "receive" and message_type in received:
                return {self._resolve(ref)["name"] for ref in operation["reply"]["messages"]}
        raise KeyError(f"{message_type} is no command of the document")


class Integrator:
    """One connection: a reply queue and an events queue of its own, named after its user
    as its broker permissions require."""

    def __init__(self, channel: AbstractChannel, user: str, contract: Contract) -> None:
        self._channel = channel
        self._user = user
        self._contract = contract
        self._reply_queue_name = f"keeper.reply.{user}.{uuid.uuid4().hex[:12]}"
        self._replies: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self.events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    async def start(self, event_patterns: list[str]) -> None:
        reply_queue = await self._channel.declare_queue(
            self._reply_queue_name, exclusive=True, auto_delete=True
        )
        await reply_queue.bind(REPLIES_EXCHANGE, routing_key=self._reply_queue_name)
        await reply_queue.consume(self._on_reply, no_ack=True)
        events = await self._channel.declare_queue(
            f"keeper.client.{self._user}.events", exclusive=True, auto_delete=True
        )
        for pattern in event_patterns:
            await events.bind(EVENTS_EXCHANGE, routing_key=pattern)
        await events.consume(self._on_event, no_ack=True)

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        waiting = self._replies.pop(message.correlation_id or "", None)
        if waiting is not None and not waiting.done():
            waiting.set_result(json.loads(message.body))

    async def _on_event(self, message: AbstractIncomingMessage) -> None:
        await self.events.put(json.loads(message.body))

    def envelope(self, message_type: str, subject: str, data: dict[str, Any]) -> bytes:
        return json.dumps(
            {
                "id": str(uuid.uuid4()),
                "type": message_type,
                "source": f"integrator/{self._user}",
                "time": datetime.now(UTC).isoformat(),
                "subject": subject,
                "schema_version": self._contract.schema_version(message_type),
                "data": data,
            }
        ).encode()

    async def command(self, body: bytes, message_type: str) -> dict[str, Any]:
        """Send one command to policy and wait for its reply (or its rejection)."""
        correlation_id = uuid.uuid4().hex
        answer: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._replies[correlation_id] = answer
        commands = await self._channel.get_exchange(COMMANDS_EXCHANGE, ensure=True)
        await commands.publish(
            aio_pika.Message(
                body,
                content_type="application/json",
                type=message_type,
                user_id=self._user,
                reply_to=self._reply_queue_name,
                correlation_id=correlation_id,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                headers={"x-keeper-deadline-ms": int((time.time() + TIMEOUT_S) * 1000)},
            ),
            routing_key=POLICY,
        )
        async with asyncio.timeout(TIMEOUT_S):
            reply = await answer
        if reply["type"] not in self._contract.reply_types(message_type):
            raise RuntimeError(f"{message_type} got {reply['type']}, which the document omits")
        return reply


def show(step: str, **facts: Any) -> None:
    print(json.dumps({"step": step, **facts}), flush=True)


async def run(url: str, asyncapi: Path) -> None:
    contract = Contract(json.loads(asyncapi.read_text(encoding="utf-8")))
    user = yarl.URL(url).user or "guest"
    connection = await aio_pika.connect(url, client_properties={"connection_name": user})
    try:
        channel = await connection.channel(publisher_confirms=True)
        client = Integrator(channel, user, contract)
        vm_id = str(uuid.uuid4())
        await client.start(["tpm.*.*", "vm.*.*"])

        spec = {"vm_id": vm_id, "name": f"app-{vm_id[:8]}", "guest_os": "windows-11"}
        reply = await client.command(
            client.envelope("tpm.enable", vm_id, {"spec": spec}), "tpm.enable"
        )
        show(
            "tpm.enable",
            reply_type=reply["type"],
            ok=reply["data"]["ok"],
            error=reply["data"].get("error"),
        )
        async with asyncio.timeout(TIMEOUT_S):
            while (event := await client.events.get())["subject"] != vm_id:
                pass
        show("event", type=event["type"], subject=event["subject"])

        reply = await client.command(client.envelope("vms.list", "vms", {}), "vms.list")
        show("vms.list", reply_type=reply["type"], vms=len(reply["data"]["vms"]))

        broken = client.envelope("tpm.enable", vm_id, {"spec": {"name": "no id"}})
        reply = await client.command(broken, "tpm.enable")
        show("invalid command", reply_type=reply["type"], code=reply["data"]["code"])
    finally:
        await connection.close()


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(f"usage: {sys.argv[0]} AMQP_URL ASYNCAPI_JSON")
    asyncio.run(run(sys.argv[1], Path(sys.argv[2])))
