"""The session's RabbitMQ as tests see it (the fixture lives in conftest.py)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import yarl


@dataclass(frozen=True)
class Broker:
    """The session's RabbitMQ: its URL, and how to add a user with permissions."""

    url: str
    add_user: Callable[[str, str], None]
    """(name, password) -> None: a user with every permission on the default vhost (what a
    user may do is a matter of topic permissions, tested apart)."""
    import_definitions: Callable[[dict[str, Any]], None]
    """A definitions document's users with their permissions (a host's or a client's, from
    ``keeper_devtools.contract.rabbitmq``), as a deployment makes them."""

    def import_user_definitions(self, document: dict[str, Any]) -> None:
        """See :attr:`import_definitions` (the demo's ``BrokerAccounts``)."""
        self.import_definitions(document)

    def url_for(self, user: str, password: str) -> str:
        """The AMQP URL of this broker as another user (its scheme and TLS options kept)."""
        return str(yarl.URL(self.url).with_user(user).with_password(password))
