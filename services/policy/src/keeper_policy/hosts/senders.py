"""A host speaks only for itself (invariant 3): policy acts on a host's event only when the
broker-validated AMQP user that published it is that host.

The body's ``host`` field is whatever the publisher wrote. Without this check a compromised
host could send ``vm.stopped(host=<victim>, reason=migrated)`` and its own ``vm.started`` and
have policy move the victim's placement to itself, evicting the VM without retrieving its
state; or keep a dead host "alive" with forged heartbeats.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

from keeper_shared.bus.client import Delivery, MessageRefusedError
from keeper_shared.messages.envelope import Envelope
from keeper_shared.messages.host_fact import HostFact

E = TypeVar("E", bound=HostFact)
HostEventHandler = Callable[[Envelope[E], Delivery], Awaitable[None]]


class HostSenders:
    """Refuses host events whose publisher is not the host they name (when verifying)."""

    def __init__(self, *, verify: bool) -> None:
        self._verify = verify

    def refusal(self, host: str, user_id: str | None) -> str | None:
        """Why the AMQP user ``user_id`` may not speak for ``host``; None when it may."""
        if not self._verify or user_id == host:
            return None
        return f"sent by AMQP user {user_id!r}, not by host {host}"

    def only_from_host(self, handler: HostEventHandler[E]) -> HostEventHandler[E]:
        """``handler``, run only for an event its host published; another publisher's
        event is dead-lettered (kept as evidence, counted, never acted on)."""

        async def checked(envelope: Envelope[E], delivery: Delivery) -> None:
            reason = self.refusal(envelope.data.host, delivery.user_id)
            if reason is not None:
                raise MessageRefusedError(f"{envelope.type}: {reason}")
            await handler(envelope, delivery)

        return checked
