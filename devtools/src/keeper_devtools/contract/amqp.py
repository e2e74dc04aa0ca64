"""The AMQP side of the document: how each channel, operation and message maps onto
RabbitMQ (AsyncAPI AMQP bindings 0.3.0, plus ``x-keeper-queue`` for what they cannot say)."""

from __future__ import annotations

from typing import Any

from keeper_devtools.contract.commands import Receiver
from keeper_shared.bus import topology

BINDING_VERSION = "0.3.0"
VHOST = "/"


def exchange_binding(exchange: str, kind: str) -> dict[str, Any]:
    """A channel that is a routing key on ``exchange`` (its address is the key)."""
    return {
        "amqp": {
            "is": "routingKey",
            "exchange": {
                "name": exchange,
                "type": kind,
                "durable": True,
                "autoDelete": False,
                "vhost": VHOST,
            },
            "bindingVersion": BINDING_VERSION,
        }
    }


def queue_extension(spec: topology.QueueSpec) -> dict[str, Any]:
    """The quorum queue behind a command channel. The AMQP binding describes a channel as
    either a routing key or a queue; senders need the key, operators the queue."""
    return {
        "name": spec.name,
        "type": "quorum",
        "durable": True,
        "deliveryLimit": spec.delivery_limit,
        "deadLetterExchange": topology.DEAD_LETTER_EXCHANGE,
        "deadLetterQueue": spec.dead_letter_queue,
    }


def receiver_queue(receiver: Receiver) -> topology.QueueSpec:
    """The queue a receiver takes its commands from (a host's, with ``{host}`` for its id)."""
    return {
        Receiver.HOST: topology.host_command_queue("{host}"),
        Receiver.STATE_STORE: topology.STATE_STORE_COMMANDS,
        Receiver.POLICY: topology.POLICY_COMMANDS,
        Receiver.STATE_STORE_FOR_HOSTS: topology.STATE_STORE_HOST_REQUESTS,
        Receiver.POLICY_FOR_HOSTS: topology.POLICY_HOST_REQUESTS,
    }[receiver]


def receiver_exchange(receiver: Receiver) -> str:
    """The direct exchange a receiver's commands are sent on."""
    if receiver in (Receiver.STATE_STORE_FOR_HOSTS, Receiver.POLICY_FOR_HOSTS):
        return topology.HOST_REQUESTS_EXCHANGE
    return topology.COMMANDS_EXCHANGE


def receiver_routing_key(receiver: Receiver) -> str:
    """The routing key a receiver's commands carry: the channel's address."""
    spec = receiver_queue(receiver)
    key = spec.host_request_key if spec.command_key is None else spec.command_key
    if key is None:
        raise ValueError(f"{spec.name} takes no commands")
    return key


def message_binding(message_type: str) -> dict[str, Any]:
    """The AMQP ``type`` property every message carries: its wire type."""
    return {
        "amqp": {
            "contentEncoding": "utf-8",
            "messageType": message_type,
            "bindingVersion": BINDING_VERSION,
        }
    }


def operation_binding(*, mandatory: bool) -> dict[str, Any]:
    """Persistent messages, acknowledged by their consumer after handling; commands are
    published mandatory so a command no queue takes fails at once."""
    return {
        "amqp": {
            "deliveryMode": 2,
            "mandatory": mandatory,
            "ack": True,
            "bindingVersion": BINDING_VERSION,
        }
    }
