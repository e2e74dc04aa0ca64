"""Handlers of the queries the store answers on its commands queue."""

from __future__ import annotations

from keeper_shared.bus.client import Delivery, Route
from keeper_shared.messages.envelope import Envelope
from keeper_shared.messages.queries import DescribeStoredState, StoredStateDescribed
from keeper_state_store.storage.repository import StateRepository
from keeper_state_store.views.newest_state import read_stored_state


class StoreQueries:
    """Read-only views of what one store replica's Redis holds."""

    def __init__(self, repository: StateRepository) -> None:
        self._redis = repository.redis

    def command_routes(self) -> list[Route]:
        """Routes of the queries on the store's commands queue."""
        return [Route(DescribeStoredState, self.on_describe)]

    async def on_describe(
        self, envelope: Envelope[DescribeStoredState], delivery: Delivery
    ) -> StoredStateDescribed:
        """The newest stored version of each kind of the VMs asked about."""
        return StoredStateDescribed(
            vms=await read_stored_state(self._redis, list(envelope.data.vm_ids))
        )
