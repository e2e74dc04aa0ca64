"""Commands only from the users allowed to send them.

A command on the direct commands exchange reaches a queue by its routing key alone, and a
broker user that may write that exchange (an integrator, the CLI) can address any queue on
it, a host's included. A host agent therefore takes commands only from the keeper's own
service users, so nobody can undefine a domain or write state past policy and the store.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from keeper_shared.bus.client import Delivery, Handler, MessageRefusedError, Route
from keeper_shared.messages.envelope import Envelope, Payload


def only_from(allowed: Collection[str], routes: list[Route]) -> list[Route]:
    """``routes`` whose handlers run only for a broker-validated user in ``allowed``; an
    empty ``allowed`` checks nothing (a stack whose services share one user)."""
    if not allowed:
        return routes
    permitted = frozenset(allowed)

    def guarded(handler: Handler) -> Handler:
        async def checked(envelope: Envelope[Any], delivery: Delivery) -> Payload | None:
            if delivery.user_id not in permitted:
                raise MessageRefusedError(
                    f"{envelope.type} from AMQP user {delivery.user_id!r}, which may not "
                    "command this service"
                )
            return await handler(envelope, delivery)

        return checked

    return [Route(route.payload_type, guarded(route.handler)) for route in routes]
