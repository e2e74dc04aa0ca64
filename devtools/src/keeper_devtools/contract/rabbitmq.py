"""RabbitMQ definitions generated from :mod:`keeper_shared.bus.topology`, so the broker
configuration under ``deploy/rabbitmq/`` never drifts from what the services declare.

``python -m keeper_devtools.contract.rabbitmq definitions`` writes
``deploy/rabbitmq/definitions.json`` (exchanges, quorum queues with their delivery limit and
dead-letter arguments, the dead-letter queues, bindings). ``host HOST`` prints the
definitions of one host: its command queue, its user (password from ``KEEPER_HOST_PASSWORD``
or a prompt) and its permissions: it may publish on ``keeper.events`` only with routing keys
ending in ``.HOST``, reply only through ``keeper.replies`` (never the default exchange),
bind only its own reply queue, and consume only its own command queue. ``integrator USER``
and ``observer USER`` print a client user's (password from ``KEEPER_USER_PASSWORD`` or a
prompt; see :func:`client_definitions`). Load any of
them with ``rabbitmqctl import_definitions FILE``.
"""

from __future__ import annotations

import argparse
import base64
import getpass
import hashlib
import json
import os
import re
import secrets
import sys
from pathlib import Path
from typing import Any

from keeper_shared.bus import topology
from keeper_shared.messages.types import HOST_ID_PATTERN

VHOST = "/"
_STATIC_QUEUES = (
    topology.STATE_STORE_EVENTS,
    topology.STATE_STORE_COMMANDS,
    topology.POLICY_EVENTS,
    topology.POLICY_COMMANDS,
    topology.STATE_STORE_HOST_REQUESTS,
    topology.POLICY_HOST_REQUESTS,
)


def _queue_arguments(spec: topology.QueueSpec) -> dict[str, Any]:
    """Exactly the arguments :func:`topology.declare_queue` declares (or it would fail with
    PRECONDITION_FAILED against what the definitions created)."""
    return {
        "x-queue-type": "quorum",
        "x-delivery-limit": spec.delivery_limit,
        "x-dead-letter-exchange": topology.DEAD_LETTER_EXCHANGE,
        "x-dead-letter-routing-key": spec.name,
        **spec.extra_arguments,
    }


def _queue(name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": name,
        "vhost": VHOST,
        "durable": True,
        "auto_delete": False,
        "arguments": arguments,
    }


def _binding(source: str, queue: str, key: str) -> dict[str, Any]:
    return {
        "source": source,
        "vhost": VHOST,
        "destination": queue,
        "destination_type": "queue",
        "routing_key": key,
        "arguments": {},
    }


def queue_definitions(
    spec: topology.QueueSpec,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The queues (the queue and its DLQ) and bindings of one :class:`QueueSpec`."""
    queues = [
        _queue(spec.dead_letter_queue, {"x-queue-type": "quorum"}),
        _queue(spec.name, _queue_arguments(spec)),
    ]
    bindings = [_binding(topology.DEAD_LETTER_EXCHANGE, spec.dead_letter_queue, spec.name)]
    bindings += [
        _binding(topology.EVENTS_EXCHANGE, spec.name, pattern) for pattern in spec.event_bindings
    ]
    if spec.command_key is not None:
        bindings.append(_binding(topology.COMMANDS_EXCHANGE, spec.name, spec.command_key))
    if spec.host_request_key is not None:
        bindings.append(_binding(topology.HOST_REQUESTS_EXCHANGE, spec.name, spec.host_request_key))
    return queues, bindings


def definitions() -> dict[str, Any]:
    """The shared part of the broker: exchanges, the services' queues, their bindings."""
    exchanges = [
        {
            "name": name,
            "vhost": VHOST,
            "type": kind,
            "durable": True,
            "auto_delete": False,
            "internal": False,
            "arguments": {},
        }
        for name, kind in (
            (topology.COMMANDS_EXCHANGE, "direct"),
            (topology.DEAD_LETTER_EXCHANGE, "direct"),
            (topology.EVENTS_EXCHANGE, "topic"),
            (topology.REPLIES_EXCHANGE, "topic"),
            (topology.HOST_REQUESTS_EXCHANGE, "direct"),
        )
    ]
    queues: list[dict[str, Any]] = []
    bindings: list[dict[str, Any]] = []
    for spec in _STATIC_QUEUES:
        spec_queues, spec_bindings = queue_definitions(spec)
        queues += spec_queues
        bindings += spec_bindings
    return {
        "vhosts": [{"name": VHOST}],
        "exchanges": exchanges,
        "queues": queues,
        "bindings": bindings,
    }


def password_hash(password: str, salt: bytes | None = None) -> str:
    """RabbitMQ's ``rabbit_password_hashing_sha256``: base64(salt + sha256(salt + pw))."""
    salt = secrets.token_bytes(4) if salt is None else salt
    digest = hashlib.sha256(salt + password.encode()).digest()
    return base64.b64encode(salt + digest).decode()


def host_definitions(host_id: str, password: str, *, salt: bytes | None = None) -> dict[str, Any]:
    """One host's command queue, user, permissions and topic permissions."""
    if not re.fullmatch(HOST_ID_PATTERN, host_id):
        raise ValueError(f"not a host id: {host_id!r} (lowercase letters, digits, '-')")
    spec = topology.host_command_queue(host_id)
    queues, bindings = queue_definitions(spec)
    own = re.escape(spec.name)
    reply = re.escape(topology.reply_queue_name(host_id, "")) + "[0-9a-f]+"
    any_reply = re.escape(topology.REPLY_QUEUE_PREFIX + ".") + r"[a-z0-9-]+\.[0-9a-f]+"
    events = re.escape(topology.EVENTS_EXCHANGE)
    commands = re.escape(topology.COMMANDS_EXCHANGE)
    dead_letter = re.escape(topology.DEAD_LETTER_EXCHANGE)
    replies = re.escape(topology.REPLIES_EXCHANGE)
    # The only requests a host sends: its own VMs' placement and state (the QEMU hook).
    host_requests = re.escape(topology.HOST_REQUESTS_EXCHANGE)
    exchanges = "|".join(
        re.escape(name)
        for name in (
            topology.EVENTS_EXCHANGE,
            topology.COMMANDS_EXCHANGE,
            topology.DEAD_LETTER_EXCHANGE,
            topology.REPLIES_EXCHANGE,
            topology.HOST_REQUESTS_EXCHANGE,
        )
    )
    return {
        "users": [
            {
                "name": host_id,
                "password_hash": password_hash(password, salt),
                "hashing_algorithm": "rabbit_password_hashing_sha256",
                "tags": [],
            }
        ],
        "permissions": [
            {
                "user": host_id,
                "vhost": VHOST,
                # Declaring (idempotently) the exchanges, its queue, DLQ and reply queue.
                "configure": rf"^({exchanges}|{own}|{own}\.dlq|{reply})$",
                # Publishing events and replies, binding its own queues. Not the default
                # exchange: it would route to any queue by name, past the topic permissions.
                "write": rf"^({events}|{replies}|{host_requests}|{own}|{own}\.dlq|{reply})$",
                # Consuming its own queue and reply queue; binding from the exchanges.
                "read": rf"^({own}|{reply}|{commands}|{dead_letter}|{replies})$",
            }
        ],
        "topic_permissions": [
            {
                "user": host_id,
                "vhost": VHOST,
                "exchange": topology.EVENTS_EXCHANGE,
                "write": rf"^[a-z0-9.-]+\.{re.escape(host_id)}$",
                "read": "^$",
            },
            {
                # Replies to any caller's reply queue; bindings only for its own, so it
                # cannot bind its queue to another caller's replies and read them.
                "user": host_id,
                "vhost": VHOST,
                "exchange": topology.REPLIES_EXCHANGE,
                "write": rf"^{any_reply}$",
                "read": rf"^{reply}$",
            },
        ],
        "queues": queues,
        "bindings": bindings,
    }


def client_definitions(
    user: str, password: str, *, commands: bool, salt: bytes | None = None
) -> dict[str, Any]:
    """An integrator's (``commands``) or a read-only observer's user and permissions.

    Both follow events: they declare, bind and consume only queues named
    ``keeper.client.<user>.*`` and bind them to any event (events carry hashes and facts,
    never state in clear: a host that opts in to inline state seals it to the store). An
    integrator also sends commands on ``keeper.commands`` and takes replies
    in its own ``keeper.reply.<user>.<hex>`` queues, bound only to its own reply keys.
    Neither may publish events, declare or delete exchanges, or touch another queue. The
    commands exchange is direct, so the broker cannot keep an integrator's command away from
    a host's queue: host agents take commands only from the services' users
    (``KEEPER_HOST_COMMAND_SENDERS``).
    """
    if not re.fullmatch(HOST_ID_PATTERN, user):
        raise ValueError(f"not a user name: {user!r} (lowercase letters, digits, '-')")
    own_queues = re.escape(topology.client_queue_name(user, "")) + r"[a-z0-9._-]+"
    reply = re.escape(topology.reply_queue_name(user, "")) + "[0-9a-f]+"
    events = re.escape(topology.EVENTS_EXCHANGE)
    replies = re.escape(topology.REPLIES_EXCHANGE)
    queues = f"{own_queues}|{reply}" if commands else own_queues
    write = f"{re.escape(topology.COMMANDS_EXCHANGE)}|{queues}" if commands else queues
    read = f"{queues}|{events}|{replies}" if commands else f"{queues}|{events}"
    topic_permissions: list[dict[str, Any]] = [
        {
            "user": user,
            "vhost": VHOST,
            "exchange": topology.EVENTS_EXCHANGE,
            "write": "^$",
            "read": ".*",
        }
    ]
    if commands:
        topic_permissions.append(
            {
                # Its reply queues bind only its own reply keys: no one else's replies.
                "user": user,
                "vhost": VHOST,
                "exchange": topology.REPLIES_EXCHANGE,
                "write": "^$",
                "read": rf"^{reply}$",
            }
        )
    return {
        "users": [
            {
                "name": user,
                "password_hash": password_hash(password, salt),
                "hashing_algorithm": "rabbit_password_hashing_sha256",
                "tags": [],
            }
        ],
        "permissions": [
            {
                "user": user,
                "vhost": VHOST,
                "configure": rf"^({queues})$",
                "write": rf"^({write})$",
                "read": rf"^({read})$",
            }
        ],
        "topic_permissions": topic_permissions,
    }


def render(document: dict[str, Any]) -> str:
    """Stable JSON text."""
    return json.dumps(document, indent=2) + "\n"


def default_definitions_path() -> Path:
    """``deploy/rabbitmq/definitions.json`` of this checkout."""
    for candidate in Path(__file__).resolve().parents:
        if (candidate / "deploy" / "local").is_dir():
            return candidate / "deploy" / "rabbitmq" / "definitions.json"
    return Path.cwd() / "deploy" / "rabbitmq" / "definitions.json"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m keeper_devtools.contract.rabbitmq",
        description="Render RabbitMQ definitions from the bus topology.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    shared = commands.add_parser("definitions", help="exchanges, service queues, bindings")
    shared.add_argument("--output", type=Path, default=None)
    shared.add_argument("--check", action="store_true", help="exit 1 if the file is stale")
    host = commands.add_parser("host", help="one host's user, permissions and queue")
    host.add_argument("host_id")
    host.add_argument("--output", type=Path, default=None, help="default: stdout")
    for kind, text in (
        ("integrator", "a user that follows events and sends commands (automation, the CLI)"),
        ("observer", "a read-only user that follows events"),
    ):
        client = commands.add_parser(kind, help=text)
        client.add_argument("user")
        client.add_argument("--output", type=Path, default=None, help="default: stdout")
    args = parser.parse_args(argv)

    if args.command == "definitions":
        output: Path = args.output or default_definitions_path()
        text = render(definitions())
        if args.check:
            if not output.exists() or output.read_text(encoding="utf-8") != text:
                print(
                    f"{output} is out of date: run "
                    "`python -m keeper_devtools.contract.rabbitmq definitions`"
                )
                return 1
            return 0
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(text, encoding="utf-8")
        print(f"wrote {output}")
        return 0

    name = args.host_id if args.command == "host" else args.user
    variable = "KEEPER_HOST_PASSWORD" if args.command == "host" else "KEEPER_USER_PASSWORD"
    password = os.environ.get(variable) or getpass.getpass(
        f"password for {args.command} user {name}: "
    )
    try:
        if args.command == "host":
            document = host_definitions(name, password)
        else:
            document = client_definitions(name, password, commands=args.command == "integrator")
        text = render(document)
    except ValueError as error:
        print(error, file=sys.stderr)
        return 2
    if args.output is None:
        sys.stdout.write(text)
    else:
        args.output.touch(mode=0o600)
        args.output.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
