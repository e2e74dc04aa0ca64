"""The demo's broker users, as a deployment has them: each host its own (its messages carry
an identity the broker validated, and it may publish only its own events and consume only
its own queue), the API an integrator's (events, commands and its own replies; nothing
else). The store and policy keep the stack's service user, check that every host speaks for
itself, and are the only senders a host takes commands from."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from keeper_devtools.contract.rabbitmq import client_definitions, host_definitions

API_USER = "keeper-api"


class BrokerAccounts(Protocol):
    """A RabbitMQ the demo may add users to (the local stack's node, a test's broker)."""

    def import_user_definitions(self, document: dict[str, Any]) -> None:
        """Create or reset the users a definitions document holds."""
        ...

    def url_for(self, user: str, password: str) -> str:
        """The broker's AMQP URL as ``user``."""
        ...


@dataclass(frozen=True)
class DemoBusUsers:
    """The AMQP URL each host agent and the API log in with."""

    host_urls: dict[str, str]
    api_url: str


async def create_bus_users(accounts: BrokerAccounts, host_ids: Sequence[str]) -> DemoBusUsers:
    """A fresh password for each user; only their hashes reach the broker."""
    host_urls = {}
    for host_id in host_ids:
        password = secrets.token_urlsafe(24)
        await asyncio.to_thread(
            accounts.import_user_definitions, host_definitions(host_id, password)
        )
        host_urls[host_id] = accounts.url_for(host_id, password)
    password = secrets.token_urlsafe(24)
    await asyncio.to_thread(
        accounts.import_user_definitions, client_definitions(API_USER, password, commands=True)
    )
    return DemoBusUsers(host_urls, accounts.url_for(API_USER, password))
