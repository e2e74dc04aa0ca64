"""The base of every message a host publishes about itself."""

from __future__ import annotations

from pydantic import Field

from keeper_shared.messages.envelope import Payload
from keeper_shared.messages.types import HostId


class HostFact(Payload):
    """Published by a host about itself. Consumers act on it only when the broker-validated
    AMQP user that published it is ``host`` (invariant 3), never on the body's word."""

    host: HostId = Field(description="The host that publishes it.")
