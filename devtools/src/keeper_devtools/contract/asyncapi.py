"""Build the AsyncAPI 3.0 document of the bus from the message models, the command table
and the topology.

The document describes vTPM Keeper as one application: it *sends* every event and
*receives* every command, answering each on the caller's reply queue. A client does the
opposite. Every message is a component whose key (its id, for generated code) is the model's
class name and whose ``name`` is its wire type.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from pydantic.json_schema import models_json_schema

from keeper_devtools.contract import amqp
from keeper_devtools.contract.catalogue import MessageRole, discover_payloads, role_of
from keeper_devtools.contract.commands import COMMANDS, ERROR_REPLY, CommandContract, Receiver
from keeper_shared.bus import topology
from keeper_shared.bus.client import DEADLINE_HEADER
from keeper_shared.bus.upgrade_levels import RELEASE_HEADER
from keeper_shared.messages.envelope import Envelope, Payload
from keeper_shared.messages.releases import RELEASE_PATTERN

ASYNCAPI_VERSION = "3.0.0"
CONTRACT_VERSION = "1.0.0"
"""The wire contract's version: the messages, not the document's layout."""
REPLIES_CHANNEL = "replies"
FOLLOW_UP_KEY = "x-keeper-follow-up-events"
_SCHEMA_REF = "#/components/schemas/{model}"
_CORRELATION_ID = "#/components/correlationIds/command"

_SERVICE_OF = {
    Receiver.HOST: "the host agent",
    Receiver.STATE_STORE: "the state store",
    Receiver.POLICY: "policy",
    Receiver.STATE_STORE_FOR_HOSTS: "the state store",
    Receiver.POLICY_FOR_HOSTS: "policy",
}


def message_id(cls: type[Payload]) -> str:
    """The message's key in ``components.messages`` and in its channel: its class name."""
    return cls.__name__


def event_channel_id(cls: type[Payload]) -> str:
    """The channel (and operation) of one event type."""
    return f"events.{cls.message_type}"


def command_operation_id(receiver: Receiver, cls: type[Payload]) -> str:
    """The operation of one command on one receiver's channel."""
    return f"{receiver.value}.{cls.message_type}"


def _doc(cls: type[Any]) -> str:
    return " ".join((cls.__doc__ or "").split())


def _ref(pointer: str) -> dict[str, str]:
    return {"$ref": pointer}


def _channel_message_ref(channel: str, cls: type[Payload]) -> dict[str, str]:
    return _ref(f"#/channels/{channel}/messages/{message_id(cls)}")


def _envelope_schema(cls: type[Payload]) -> dict[str, Any]:
    """The envelope's JSON schema with ``data`` pointing at the payload's schema."""
    properties: dict[str, Any] = {}
    for name, field in Envelope.model_fields.items():
        if name == "data":
            properties[name] = {
                "$ref": _SCHEMA_REF.format(model=cls.__name__),
                "description": field.description,
            }
            continue
        properties[name] = {"description": field.description}
    properties["id"].update(type="string", format="uuid")
    properties["type"].update(type="string", const=cls.message_type)
    properties["source"].update(type="string")
    properties["time"].update(type="string", format="date-time")
    properties["subject"].update(type="string")
    properties["schema_version"].update(type="integer", const=cls.schema_version)
    return {
        "type": "object",
        "additionalProperties": False,
        "required": list(Envelope.model_fields),
        "properties": properties,
    }


def _headers(role: MessageRole) -> dict[str, Any]:
    if role is not MessageRole.COMMAND:
        return {"type": "object"}
    return {
        "type": "object",
        "properties": {
            DEADLINE_HEADER: {
                "type": "integer",
                "description": (
                    "Unix time (ms) after which the command is void: a receiver that gets "
                    "it later answers `command.rejected` (`expired`) and drops it."
                ),
            },
            RELEASE_HEADER: {
                "type": "string",
                "pattern": RELEASE_PATTERN,
                "description": (
                    "The keeper release whose schema versions the sender reads; the reply "
                    "comes at them. Without it, at the oldest release the receiver still "
                    "talks to (docs/upgrades.md)."
                ),
            },
        },
    }


def _message(cls: type[Payload]) -> dict[str, Any]:
    role = role_of(cls)
    message: dict[str, Any] = {
        "name": cls.message_type,
        "title": cls.__name__,
        "summary": _doc(cls),
        "contentType": "application/json",
        "headers": _headers(role),
        "payload": _envelope_schema(cls),
    }
    if role is not MessageRole.EVENT:
        message["correlationId"] = _ref(_CORRELATION_ID)
    message["bindings"] = amqp.message_binding(cls.message_type)
    message["x-role"] = role.value
    message["x-schema-version"] = cls.schema_version
    return message


def _event_channel(cls: type[Payload]) -> dict[str, Any]:
    return {
        "address": topology.event_routing_key(cls.message_type, "{origin}"),
        "title": cls.message_type,
        "description": (
            f"`{cls.message_type}` events on the `{topology.EVENTS_EXCHANGE}` topic "
            "exchange; the last word of the routing key is who sent it (a host id, "
            "`state-store`, `policy`), which per-host topic permissions pin."
        ),
        "parameters": {"origin": {"description": "Host id or service name of the publisher."}},
        "messages": {message_id(cls): _ref(f"#/components/messages/{message_id(cls)}")},
        "bindings": amqp.exchange_binding(topology.EVENTS_EXCHANGE, "topic"),
    }


def _command_channel(receiver: Receiver, commands: list[type[Payload]]) -> dict[str, Any]:
    spec = amqp.receiver_queue(receiver)
    exchange = amqp.receiver_exchange(receiver)
    if exchange == topology.HOST_REQUESTS_EXCHANGE:
        who = (
            f"What a host asks {_SERVICE_OF[receiver]} for itself, on the `{exchange}` direct "
            "exchange (the only exchange a host's user may send requests on)"
        )
    else:
        who = f"Commands for {_SERVICE_OF[receiver]} on the `{exchange}` direct exchange"
    channel: dict[str, Any] = {
        "address": amqp.receiver_routing_key(receiver),
        "title": spec.name,
        "description": (
            f"{who}, routed by the address as routing key to the quorum queue `{spec.name}` "
            f"(dead letters in `{spec.dead_letter_queue}`). Send each with a `reply_to` and "
            "a `correlation_id`: the reply goes to that queue. A command the receiver cannot "
            "take (undecodable, unknown type, invalid, past its "
            f"`{DEADLINE_HEADER}`, or from a sender it does not serve) is answered "
            f"`{ERROR_REPLY.message_type}` with a code."
        ),
        "messages": {
            message_id(cls): _ref(f"#/components/messages/{message_id(cls)}") for cls in commands
        },
        "bindings": amqp.exchange_binding(exchange, "direct"),
        "x-keeper-queue": amqp.queue_extension(spec),
    }
    if receiver is Receiver.HOST:
        channel["parameters"] = {"host": {"description": "The target host's id."}}
    return channel


def _replies_channel(replies: Iterable[type[Payload]]) -> dict[str, Any]:
    return {
        # The address is the caller's: each command's operation says where it is read.
        "address": None,
        "title": "reply queue",
        "description": (
            "The caller's own exclusive reply queue (`keeper.reply.<user>.<12 hex>`), bound "
            f"to the `{topology.REPLIES_EXCHANGE}` topic exchange with its name as the "
            "routing key. A reply carries the command's `correlation_id`."
        ),
        "messages": {
            message_id(cls): _ref(f"#/components/messages/{message_id(cls)}")
            for cls in sorted(replies, key=message_id)
        },
        "bindings": amqp.exchange_binding(topology.REPLIES_EXCHANGE, "topic"),
    }


def _event_operation(cls: type[Payload]) -> dict[str, Any]:
    channel = event_channel_id(cls)
    return {
        "action": "send",
        "channel": _ref(f"#/channels/{channel}"),
        "title": f"Publish {cls.message_type}",
        "summary": _doc(cls),
        "messages": [_channel_message_ref(channel, cls)],
        "bindings": amqp.operation_binding(mandatory=False),
    }


def _command_operation(
    receiver: Receiver, cls: type[Payload], contract: CommandContract
) -> dict[str, Any]:
    reply_types = [contract.reply, ERROR_REPLY]
    answered = " or ".join(f"`{reply.message_type}` ({reply.__name__})" for reply in reply_types)
    follow_ups = [event.message_type for event in contract.follow_up_events]
    followed = (
        "Followed by the events " + ", ".join(f"`{name}`" for name in follow_ups) + "."
        if follow_ups
        else "No event follows it."
    )
    return {
        "action": "receive",
        "channel": _ref(f"#/channels/{receiver.value}"),
        "title": f"{cls.message_type} to {_SERVICE_OF[receiver]}",
        "summary": _doc(cls),
        "description": f"Answered {answered} on the caller's reply queue. {followed}",
        "messages": [_channel_message_ref(receiver.value, cls)],
        "reply": {
            "address": {
                "location": "$message.header#/reply_to",
                "description": (
                    "The command's AMQP `reply_to` property: the caller's reply queue, "
                    f"which is also the routing key on `{topology.REPLIES_EXCHANGE}`."
                ),
            },
            "channel": _ref(f"#/channels/{REPLIES_CHANNEL}"),
            "messages": [_channel_message_ref(REPLIES_CHANNEL, reply) for reply in reply_types],
        },
        "bindings": amqp.operation_binding(mandatory=True),
        FOLLOW_UP_KEY: follow_ups,
    }


def _server() -> dict[str, Any]:
    return {
        "host": "{host}:5672",
        "protocol": "amqp",
        "protocolVersion": "0-9-1",
        "title": "RabbitMQ",
        "description": (
            f"A RabbitMQ 3.10+ node or cluster (quorum queues), virtual host `{amqp.VHOST}`."
        ),
        "variables": {"host": {"default": "localhost"}},
    }


def _check_unique_ids(payloads: list[type[Payload]]) -> None:
    seen: dict[str, type[Payload]] = {}
    for cls in payloads:
        other = seen.setdefault(message_id(cls), cls)
        if other is not cls:
            raise ValueError(
                f"two messages are named {cls.__name__} ({other.__module__}, {cls.__module__})"
            )


def build_document() -> dict[str, Any]:
    """The whole AsyncAPI document as a JSON-ready dict (deterministic)."""
    payloads = discover_payloads()
    _check_unique_ids(payloads)
    missing = [cls.__name__ for cls in COMMANDS if cls not in payloads]
    if missing:
        raise ValueError(f"the command table names messages not found: {', '.join(missing)}")
    _, schemas = models_json_schema(
        [(cls, "validation") for cls in payloads], ref_template=_SCHEMA_REF
    )

    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    for cls in payloads:
        if role_of(cls) is MessageRole.EVENT:
            channels[event_channel_id(cls)] = _event_channel(cls)
            operations[event_channel_id(cls)] = _event_operation(cls)
    for receiver in Receiver:
        commands = [
            cls for cls in payloads if cls in COMMANDS and receiver in COMMANDS[cls].receivers
        ]
        if not commands:
            continue
        channels[receiver.value] = _command_channel(receiver, commands)
        for cls in commands:
            operations[command_operation_id(receiver, cls)] = _command_operation(
                receiver, cls, COMMANDS[cls]
            )
    replies = [cls for cls in payloads if role_of(cls) is MessageRole.REPLY]
    channels[REPLIES_CHANNEL] = _replies_channel(replies)

    return {
        "asyncapi": ASYNCAPI_VERSION,
        "id": "urn:vtpm-keeper:bus",
        "info": {
            "title": "vTPM Keeper bus",
            "version": CONTRACT_VERSION,
            "description": (
                "Every message of vTPM Keeper, generated from the pydantic models in "
                "`keeper_shared.messages` by `python -m keeper_devtools.contract`; do not "
                "edit by hand. The document describes vTPM Keeper as one application: it "
                "sends the events and receives the commands, answering each on the "
                "caller's reply queue (a client does the opposite). Each message travels "
                "in a CloudEvents-style envelope whose `schema_version` is the payload's; "
                "older versions are upcast on read. Each command operation names its reply, "
                f"its error reply (`{ERROR_REPLY.message_type}`) and, in `{FOLLOW_UP_KEY}`, "
                "the events that follow it."
            ),
        },
        "defaultContentType": "application/json",
        "servers": {"rabbitmq": _server()},
        "channels": dict(sorted(channels.items())),
        "operations": dict(sorted(operations.items())),
        "components": {
            "messages": {
                message_id(cls): _message(cls) for cls in sorted(payloads, key=message_id)
            },
            "schemas": dict(sorted(schemas.get("$defs", {}).items())),
            "correlationIds": {
                "command": {
                    "location": "$message.header#/correlation_id",
                    "description": (
                        "The AMQP `correlation_id` property: the caller sets it on the "
                        "command (the keeper's services use the envelope `id`) and the "
                        "reply carries it back."
                    ),
                }
            },
        },
        "x-event-queues": {
            spec.name: {
                "bindings": list(spec.event_bindings),
                "deadLetterQueue": spec.dead_letter_queue,
                "deliveryLimit": spec.delivery_limit,
            }
            for spec in (topology.STATE_STORE_EVENTS, topology.POLICY_EVENTS)
        },
    }


def render() -> str:
    """The document as committed: JSON, sorted where order carries no meaning."""
    return json.dumps(build_document(), indent=2, ensure_ascii=False) + "\n"
