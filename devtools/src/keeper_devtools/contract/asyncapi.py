"""Build the AsyncAPI 2.6 document of the bus from the message models and the topology."""

from __future__ import annotations

import enum
import importlib
import json
import pkgutil
from dataclasses import dataclass
from typing import Any

from pydantic.json_schema import models_json_schema

import keeper_shared.messages
from keeper_shared.bus import topology
from keeper_shared.bus.client import DEADLINE_HEADER
from keeper_shared.messages.envelope import Envelope, Payload

ASYNCAPI_VERSION = "2.6.0"
CONTRACT_VERSION = "1.0.0"
_SCHEMA_REF = "#/components/schemas/{model}"


class MessageRole(enum.StrEnum):
    """How a message travels."""

    EVENT = "event"
    """A fact, published to the events exchange with the key ``<type>.<origin>``."""
    HOST_COMMAND = "host-command"
    """An imperative for one host agent, on its own command queue."""
    STORE_COMMAND = "store-command"
    """An imperative for any state-store replica."""
    POLICY_COMMAND = "policy-command"
    """An imperative for any policy replica."""
    STORE_HOST_REQUEST = "store-host-request"
    """What a host asks the store for itself (the QEMU hook), on its own exchange."""
    POLICY_HOST_REQUEST = "policy-host-request"
    """What a host asks policy for itself (the QEMU hook), on its own exchange."""
    REPLY = "reply"
    """The answer to a command, sent to the caller's reply queue."""


_COMMANDS: dict[MessageRole, frozenset[str]] = {
    MessageRole.HOST_COMMAND: frozenset(
        {
            "state.fetch",
            "vm.prepare",
            "vm.start",
            "vm.shutdown",
            "vm.poweroff",
            "vm.undefine",
            "vm.set-epoch",
            "vm.suspend",
            "vm.resume",
            "vm.snapshot-domain",
            "vm.snapshot-domain-delete",
        }
    ),
    MessageRole.STORE_COMMAND: frozenset(
        {
            "state.retrieve",
            "state.restore",
            "state.history",
            "snapshot.create",
            "snapshot.delete",
            "snapshot.list",
            "vm.clone",
            "state.export",
            "state.import",
            "state.delete",
            "state.describe",
            "state.ek.read",
            "state.tpm.accept",
        }
    ),
    MessageRole.POLICY_COMMAND: frozenset(
        {
            "tpm.enable",
            "tpm.disable",
            "vm.place",
            "vm.stop",
            "vm.snapshot",
            "vm.adopt",
            "vms.list",
            "vms.unprotected.list",
            "hosts.list",
            "template.create",
            "template.delete",
            "templates.list",
            "vm.create-from-template",
        }
    ),
    MessageRole.STORE_HOST_REQUEST: frozenset({"state.newest"}),
    MessageRole.POLICY_HOST_REQUEST: frozenset({"vm.claim"}),
    MessageRole.REPLY: frozenset(
        {
            "command.done",
            "command.rejected",
            "state.newest.read",
            "vm.claimed",
            "state.fetched",
            "state.history-listed",
            "snapshot.listed",
            "state.exported",
            "state.described",
            "state.ek.read-result",
            "vms.listed",
            "vms.unprotected.listed",
            "vm.adoption-result",
            "hosts.listed",
            "template.created",
            "templates.listed",
        }
    ),
}


def role_of(message_type: str) -> MessageRole:
    """The role of a message type; anything not named a command or reply is an event (a
    fact in the past tense, as the design asks)."""
    for role, types in _COMMANDS.items():
        if message_type in types:
            return role
    return MessageRole.EVENT


def discover_payloads() -> list[type[Payload]]:
    """Every concrete message model under ``keeper_shared.messages``, sorted by type."""
    package = keeper_shared.messages
    for module in pkgutil.walk_packages(package.__path__, prefix=f"{package.__name__}."):
        importlib.import_module(module.name)
    found: dict[str, type[Payload]] = {}
    pending: list[type[Payload]] = list(Payload.__subclasses__())
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        if not cls.__module__.startswith(f"{package.__name__}."):
            continue
        message_type = getattr(cls, "message_type", None)
        if not isinstance(message_type, str):
            continue  # an abstract family base
        other = found.get(message_type)
        if other is not None and other is not cls:
            raise ValueError(f"{message_type!r} is both {other.__name__} and {cls.__name__}")
        found[message_type] = cls
    return [found[name] for name in sorted(found)]


def _message_name(cls: type[Payload]) -> str:
    return cls.__name__


def _doc(cls: type[Any]) -> str:
    return " ".join((cls.__doc__ or "").split())


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


@dataclass(frozen=True)
class _Channel:
    name: str
    description: str
    bindings: dict[str, Any]
    parameters: dict[str, Any]


def _queue_binding(spec: topology.QueueSpec) -> dict[str, Any]:
    return {
        "amqp": {
            "is": "queue",
            "queue": {"name": spec.name, "durable": True, "exclusive": False, "autoDelete": False},
            "bindingVersion": "0.2.0",
            "x-arguments": {
                "x-queue-type": "quorum",
                "x-delivery-limit": spec.delivery_limit,
                "x-dead-letter-exchange": topology.DEAD_LETTER_EXCHANGE,
                "x-dead-letter-routing-key": spec.name,
            },
            "x-dead-letter-queue": spec.dead_letter_queue,
        }
    }


def _message_ref(cls: type[Payload]) -> dict[str, str]:
    return {"$ref": f"#/components/messages/{_message_name(cls)}"}


def _one_of(classes: list[type[Payload]]) -> dict[str, Any]:
    refs: list[dict[str, Any]] = [_message_ref(cls) for cls in classes]
    return refs[0] if len(refs) == 1 else {"oneOf": refs}


def build_document() -> dict[str, Any]:
    """The whole AsyncAPI document as a JSON-ready dict (deterministic)."""
    payloads = discover_payloads()
    by_role: dict[MessageRole, list[type[Payload]]] = {role: [] for role in MessageRole}
    for cls in payloads:
        by_role[role_of(cls.message_type)].append(cls)

    _, schemas = models_json_schema(
        [(cls, "validation") for cls in payloads], ref_template=_SCHEMA_REF
    )
    components_schemas: dict[str, Any] = dict(schemas.get("$defs", {}))

    messages: dict[str, Any] = {}
    for cls in payloads:
        role = role_of(cls.message_type)
        messages[_message_name(cls)] = {
            "name": cls.message_type,
            "title": cls.__name__,
            "summary": _doc(cls),
            "contentType": "application/json",
            "payload": _envelope_schema(cls),
            "headers": (
                {
                    "type": "object",
                    "properties": {
                        DEADLINE_HEADER: {
                            "type": "integer",
                            "description": "Unix time (ms) after which the command is void.",
                        }
                    },
                }
                if role not in (MessageRole.EVENT, MessageRole.REPLY)
                else {"type": "object"}
            ),
            "x-role": role.value,
            "x-schema-version": cls.schema_version,
            "bindings": {
                "amqp": {
                    "contentEncoding": "utf-8",
                    "messageType": cls.message_type,
                    "bindingVersion": "0.2.0",
                }
            },
        }

    channels: dict[str, Any] = {}
    for cls in by_role[MessageRole.EVENT]:
        channels[f"{cls.message_type}.{{origin}}"] = {
            "description": (
                f"`{cls.message_type}` events on the `{topology.EVENTS_EXCHANGE}` topic "
                "exchange; the last word of the routing key is who sent it (a host id, "
                "`state-store`, `policy`), which per-host topic permissions pin."
            ),
            "parameters": {
                "origin": {
                    "description": "Host id or service name of the publisher.",
                    "schema": {"type": "string"},
                }
            },
            "subscribe": {
                "operationId": f"on_{cls.message_type.replace('.', '_').replace('-', '_')}",
                "message": _message_ref(cls),
            },
            "bindings": {
                "amqp": {
                    "is": "routingKey",
                    "exchange": {
                        "name": topology.EVENTS_EXCHANGE,
                        "type": "topic",
                        "durable": True,
                        "autoDelete": False,
                        "vhost": "/",
                    },
                    "bindingVersion": "0.2.0",
                }
            },
        }

    command_queues: list[tuple[MessageRole, topology.QueueSpec, str]] = [
        (MessageRole.HOST_COMMAND, topology.host_command_queue("{host}"), "send_host_command"),
        (MessageRole.STORE_COMMAND, topology.STATE_STORE_COMMANDS, "send_store_command"),
        (MessageRole.POLICY_COMMAND, topology.POLICY_COMMANDS, "send_policy_command"),
    ]
    for role, spec, operation in command_queues:
        if not by_role[role]:
            continue
        channel: dict[str, Any] = {
            "description": (
                f"Commands on the `{topology.COMMANDS_EXCHANGE}` direct exchange with the "
                f"routing key `{spec.command_key}`, consumed from the quorum queue "
                f"`{spec.name}` (dead letters in `{spec.dead_letter_queue}`). The reply "
                f"goes to the `{topology.REPLIES_EXCHANGE}` topic exchange with the AMQP "
                "`reply_to` as its routing key and the same `correlation_id`. A command "
                "the receiver cannot take (undecodable, unknown type, invalid, or past its "
                "`x-keeper-deadline-ms`) is answered `command.rejected` with a code."
            ),
            "publish": {"operationId": operation, "message": _one_of(by_role[role])},
            "bindings": _queue_binding(spec),
        }
        if role is MessageRole.HOST_COMMAND:
            channel["parameters"] = {
                "host": {"description": "The target host's id.", "schema": {"type": "string"}}
            }
        channels[spec.name] = channel
    host_request_queues = [
        (MessageRole.STORE_HOST_REQUEST, topology.STATE_STORE_HOST_REQUESTS, "send_store_request"),
        (MessageRole.POLICY_HOST_REQUEST, topology.POLICY_HOST_REQUESTS, "send_policy_request"),
    ]
    for role, spec, operation in host_request_queues:
        channels[spec.name] = {
            "description": (
                f"What a host asks for itself, on the `{topology.HOST_REQUESTS_EXCHANGE}` "
                f"direct exchange with the routing key `{spec.host_request_key}` (the only "
                f"exchange a host's user may send requests on), consumed from `{spec.name}` "
                f"(dead letters in `{spec.dead_letter_queue}`); the store's also takes "
                "`state.retrieve` of the host's own VMs. Replies as for commands."
            ),
            "publish": {"operationId": operation, "message": _one_of(by_role[role])},
            "bindings": _queue_binding(spec),
        }
    if by_role[MessageRole.REPLY]:
        channels["{reply_to}"] = {
            "description": (
                "The caller's exclusive reply queue, named by `reply_to` and bound to "
                f"`{topology.REPLIES_EXCHANGE}` with that name as the routing key."
            ),
            "parameters": {
                "reply_to": {
                    "description": "Reply queue of the caller.",
                    "schema": {"type": "string"},
                }
            },
            "subscribe": {
                "operationId": "on_reply",
                "message": _one_of(by_role[MessageRole.REPLY]),
            },
        }

    return {
        "asyncapi": ASYNCAPI_VERSION,
        "id": "urn:vtpm-keeper:bus",
        "info": {
            "title": "vTPM Keeper bus",
            "version": CONTRACT_VERSION,
            "description": (
                "Every message of vTPM Keeper, generated from the pydantic models in "
                "`keeper_shared.messages` by `python -m keeper_devtools.contract`; do not "
                "edit by hand. Each message travels in a CloudEvents-style envelope whose "
                "`schema_version` is the payload's; older versions are upcast on read."
            ),
        },
        "defaultContentType": "application/json",
        "servers": {
            "rabbitmq": {
                "url": "amqp://{host}:5672/",
                "protocol": "amqp",
                "protocolVersion": "0-9-1",
                "description": "A RabbitMQ 3.10+ cluster (quorum queues).",
                "variables": {"host": {"default": "localhost"}},
            }
        },
        "channels": dict(sorted(channels.items())),
        "components": {
            "messages": dict(sorted(messages.items())),
            "schemas": dict(sorted(components_schemas.items())),
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
