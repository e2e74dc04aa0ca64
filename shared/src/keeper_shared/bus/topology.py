"""Every exchange, queue, binding and limit of the bus, declared in one place.

Events go to a topic exchange with the routing key ``<type>.<origin>`` (origin = host id or
service name), so per-host topic permissions can pin a host to keys ending in its own id.
Commands go to a direct exchange keyed by the target (a host's id, ``state-store``,
``policy``). Replies go to a topic exchange keyed by the caller's reply queue, never through
the default exchange, which routes to any queue by name: a host allowed to publish there
could drop a message straight into a service's queue, past its topic permissions. Every
queue is a quorum queue with an explicit delivery limit (RabbitMQ 3.10 has no default) and
dead-letters into a per-queue DLQ, so a poison message is parked after a few attempts
instead of looping forever.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractQueue

EVENTS_EXCHANGE = "keeper.events"
COMMANDS_EXCHANGE = "keeper.commands"
DEAD_LETTER_EXCHANGE = "keeper.dead-letter"
REPLIES_EXCHANGE = "keeper.replies"
"""Topic, so topic permissions can pin a host's bindings to its own reply queue's key."""
HOST_REQUESTS_EXCHANGE = "keeper.host-requests"
"""Direct, bound only by the host-requests queues: the one exchange a host's broker user may
send requests on, so it can ask what a host may ask and nothing else (topic permissions do
not apply to the direct commands exchange)."""
REPLY_QUEUE_PREFIX = "keeper.reply"
DELIVERY_LIMIT = 5
"""Attempts before a message is dead-lettered: enough for transient faults, not a loop."""

STATE_STORE = "state-store"
POLICY = "policy"


@dataclass(frozen=True)
class QueueSpec:
    """A durable quorum queue, what feeds it, and its dead-letter queue."""

    name: str
    event_bindings: tuple[str, ...] = ()
    command_key: str | None = None
    host_request_key: str | None = None
    """Routing key on `HOST_REQUESTS_EXCHANGE` that feeds this queue, if any."""
    delivery_limit: int = DELIVERY_LIMIT
    extra_arguments: dict[str, int | str] = field(default_factory=dict)

    @property
    def dead_letter_queue(self) -> str:
        """Name of the queue that parks what this queue gave up on."""
        return f"{self.name}.dlq"


def event_routing_key(message_type: str, origin: str) -> str:
    """Routing key of an event: its type, then who sent it."""
    return f"{message_type}.{origin}"


def host_command_key(host_id: str) -> str:
    """Routing key of commands for one host."""
    return f"host.{host_id}"


def reply_queue_name(origin: str, unique: str) -> str:
    """A caller's exclusive reply queue, also the routing key replies to it carry."""
    return f"{REPLY_QUEUE_PREFIX}.{origin}.{unique}"


CLIENT_QUEUE_PREFIX = "keeper.client"
"""Queues a client (the CLI, an integrator, an observer) declares to follow events are
named ``keeper.client.<its broker user>.<anything>``: its broker permissions allow those."""


def client_queue_name(user: str, name: str) -> str:
    """An event queue of the client whose broker user is ``user``."""
    return f"{CLIENT_QUEUE_PREFIX}.{user}.{name}"


def host_command_queue(host_id: str) -> QueueSpec:
    """The queue a host agent takes its commands from."""
    return QueueSpec(name=f"keeper.host.{host_id}.commands", command_key=host_command_key(host_id))


STATE_STORE_EVENTS = QueueSpec(
    name="keeper.state-store.events",
    event_bindings=(
        "state.changed.*",
        "host.heartbeat.*",
        # The store drops a lost host's sealing key; only policy declares a host lost.
        event_routing_key("host.lost", POLICY),
    ),
)
STATE_STORE_COMMANDS = QueueSpec(name="keeper.state-store.commands", command_key=STATE_STORE)
POLICY_EVENTS = QueueSpec(
    name="keeper.policy.events",
    event_bindings=(
        "host.heartbeat.*",
        "vm.*.*",
        "state.persisted.*",
        "tpm.state.stranded.*",
        # Only the store deletes state; a host's user may not publish with its origin.
        event_routing_key("state.deleted", STATE_STORE),
        event_routing_key("state.tpm.reset", STATE_STORE),
        event_routing_key("state.tpm.reset.cleared", STATE_STORE),
    ),
)
POLICY_COMMANDS = QueueSpec(name="keeper.policy.commands", command_key=POLICY)
POLICY_HOST_REQUESTS = QueueSpec(name="keeper.policy.host-requests", host_request_key=POLICY)
"""What hosts ask policy (``vm.claim``): kept apart from policy's commands so a host's
broker user can be allowed to send these and nothing else."""
STATE_STORE_HOST_REQUESTS = QueueSpec(
    name="keeper.state-store.host-requests", host_request_key=STATE_STORE
)
"""What hosts ask the store (``state.newest``, ``state.retrieve`` of their own VMs)."""


async def declare_exchanges(channel: AbstractChannel) -> tuple[AbstractExchange, AbstractExchange]:
    """Declare every exchange (idempotent); return the events and commands exchanges."""
    await channel.declare_exchange(DEAD_LETTER_EXCHANGE, aio_pika.ExchangeType.DIRECT, durable=True)
    await channel.declare_exchange(REPLIES_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True)
    await channel.declare_exchange(
        HOST_REQUESTS_EXCHANGE, aio_pika.ExchangeType.DIRECT, durable=True
    )
    events = await channel.declare_exchange(
        EVENTS_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True
    )
    commands = await channel.declare_exchange(
        COMMANDS_EXCHANGE, aio_pika.ExchangeType.DIRECT, durable=True
    )
    return events, commands


async def declare_queue(channel: AbstractChannel, spec: QueueSpec) -> AbstractQueue:
    """Declare ``spec``'s quorum queue, its DLQ and its bindings (idempotent)."""
    await declare_exchanges(channel)
    dead_letters = await channel.declare_queue(
        spec.dead_letter_queue, durable=True, arguments={"x-queue-type": "quorum"}
    )
    await dead_letters.bind(DEAD_LETTER_EXCHANGE, routing_key=spec.name)
    queue = await channel.declare_queue(
        spec.name,
        durable=True,
        arguments={
            "x-queue-type": "quorum",
            "x-delivery-limit": spec.delivery_limit,
            "x-dead-letter-exchange": DEAD_LETTER_EXCHANGE,
            "x-dead-letter-routing-key": spec.name,
            **spec.extra_arguments,
        },
    )
    for pattern in spec.event_bindings:
        await queue.bind(EVENTS_EXCHANGE, routing_key=pattern)
    if spec.command_key is not None:
        await queue.bind(COMMANDS_EXCHANGE, routing_key=spec.command_key)
    if spec.host_request_key is not None:
        await queue.bind(HOST_REQUESTS_EXCHANGE, routing_key=spec.host_request_key)
    return queue
