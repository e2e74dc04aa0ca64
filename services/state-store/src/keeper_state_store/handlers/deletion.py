"""``state.delete``: forget a stopped VM's stored state, its snapshots, its data key and
the libvirt secret its TPM state was encrypted with.

One Lua script checks the placement and deletes, so a VM placed meanwhile keeps its state.
Deleting the wrapped data key is what makes the deletion final: a Redis backup taken before
still holds the ciphertext, which nothing can open any more.
"""

from __future__ import annotations

import json
from importlib import resources

import structlog

from keeper_shared.bus.client import BusClient, Delivery, Route
from keeper_shared.messages.deletion import DeleteState, StateDeleted
from keeper_shared.messages.envelope import Envelope
from keeper_shared.messages.replies import DeleteStateReply
from keeper_shared.messages.types import StateKind
from keeper_shared.redis_access.keys import (
    data_key_key,
    kind_state_keys,
    placement_key,
    scrub_lock_key,
    snapshots_key,
    tpm_secret_key,
)
from keeper_state_store.storage.replication import run_replicated
from keeper_state_store.storage.repository import StateRepository

log = structlog.get_logger(__name__)


class DeletionService:
    """The store's ``state.delete`` handler."""

    def __init__(self, repository: StateRepository, bus: BusClient) -> None:
        self._redis = repository.redis
        self._replicas = repository.replicas
        self._bus = bus
        script = resources.files(__package__).joinpath("delete_state.lua").read_text()
        self._delete = self._redis.register_script(script)

    def command_routes(self) -> list[Route]:
        """Routes of this service on the store's commands queue."""
        return [Route(DeleteState, self.on_delete)]

    async def on_delete(
        self, envelope: Envelope[DeleteState], delivery: Delivery
    ) -> DeleteStateReply:
        """Delete the VM's state unless it is placed; announce what was deleted."""
        request = envelope.data
        vm_id = request.vm_id
        kinds = list(StateKind)
        per_kind = [kind_state_keys(vm_id, kind) for kind in kinds]
        keys = [
            placement_key(vm_id),
            snapshots_key(vm_id),
            data_key_key(vm_id),
            tpm_secret_key(vm_id),
            scrub_lock_key(vm_id),
            *(key for group in per_kind for key in group),
        ]
        args = [len(per_kind[0]), *(kind.value for kind in kinds)]
        # Replicated before it is reported: a Redis failover must not bring deleted state
        # (and the data key that opens it) back.
        (reply,) = await run_replicated(
            self._redis,
            self._replicas,
            lambda pipe: self._delete(keys=keys, args=args, client=pipe),
        )
        if reply[0] == b"placed":
            host = reply[1].decode()
            return DeleteStateReply.failed(
                f"VM {vm_id} is placed on {host}: stop it first, its state is in use"
            )
        snapshots = sorted(name for name in json.loads(reply[1]) if isinstance(name, str))
        versions = {kind: int(count) for kind, count in zip(kinds, reply[2:], strict=True)}
        log.warning(
            "state deleted",
            vm_id=vm_id,
            versions={kind.value: count for kind, count in versions.items()},
            snapshots=len(snapshots),
            requested_by=delivery.user_id,
            reason=request.reason,
        )
        await self._bus.publish_event(
            StateDeleted(
                vm_id=vm_id,
                versions=versions,
                snapshots=snapshots,
                requested_by=delivery.user_id,
                reason=request.reason,
            ),
            subject=vm_id,
        )
        return DeleteStateReply(
            ok=True, deleted_versions=versions, deleted_snapshots=len(snapshots)
        )
