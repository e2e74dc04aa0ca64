"""``tpm.disable``: a stopped VM stops having a keeper-managed TPM.

The order matters: the store deletes the state first (it refuses while the VM is placed),
then the registration goes. If the second step fails, the request can simply be repeated:
deleting absent state is not an error.
"""

from __future__ import annotations

import structlog

from keeper_policy.gateway import Gateway
from keeper_policy.storage.vm_registry import PolicyRegistry, UnknownVmError
from keeper_policy.workflows.engine import WorkflowEngine
from keeper_shared.bus.topology import STATE_STORE
from keeper_shared.messages.deletion import DeleteState, DisableTpm, TpmDisabled
from keeper_shared.messages.replies import DeleteStateReply, DisableTpmReply

log = structlog.get_logger(__name__)


class TpmDisabler:
    """Decides and carries out ``tpm.disable``."""

    def __init__(
        self,
        registry: PolicyRegistry,
        engine: WorkflowEngine,
        gateway: Gateway,
        *,
        store_timeout_s: float,
    ) -> None:
        self._registry = registry
        self._engine = engine
        self._gateway = gateway
        self._store_timeout_s = store_timeout_s

    async def disable(self, request: DisableTpm, requested_by: str | None) -> DisableTpmReply:
        """Delete the VM's stored state and its registration, if it runs nowhere."""
        vm_id = request.vm_id
        try:
            vm = await self._registry.vm(vm_id)
        except UnknownVmError as error:
            return DisableTpmReply.failed(str(error))
        if vm.host is not None:
            return DisableTpmReply.failed(f"VM {vm_id} runs on {vm.host}: shut it down first")
        running = await self._engine.current(vm_id)
        if running is not None:
            return DisableTpmReply.failed(
                f"a {running.kind} of VM {vm_id} is in progress; try again later"
            )
        reason = request.reason or "TPM disabled"
        deleted = await self._gateway.call(
            STATE_STORE,
            DeleteState(vm_id=vm_id, reason=reason),
            DeleteStateReply,
            vm_id,
            self._store_timeout_s,
        )
        if not deleted.ok:
            return DisableTpmReply.failed(
                f"the store did not delete the state: {deleted.error}", timed_out=deleted.timed_out
            )
        placed_on = await self._registry.forget(vm_id)
        if placed_on is not None:
            # Placed between our check and the store's: the store refused then, so this is
            # only reachable if it was placed after the deletion; it starts with no state.
            return DisableTpmReply.failed(
                f"VM {vm_id} was started on {placed_on} meanwhile; its TPM stays enabled"
            )
        log.warning("TPM disabled", vm_id=vm_id, requested_by=requested_by, reason=reason)
        await self._gateway.publish(
            TpmDisabled(vm_id=vm_id, requested_by=requested_by, reason=reason), vm_id
        )
        return DisableTpmReply(
            ok=True,
            deleted_versions=deleted.deleted_versions,
            deleted_snapshots=deleted.deleted_snapshots,
        )
