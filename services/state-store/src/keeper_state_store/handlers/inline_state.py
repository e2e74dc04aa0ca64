"""Storing the state a host sent inline with its ``state.changed``, without fetching it.

A pushed blob is as trusted as a fetched one, because everything that makes a fetched
blob trustworthy holds for it too:

- **who sent it**: the event's publisher is the broker-validated AMQP user, checked to be
  the host it speaks for before anything here runs (invariant 3), exactly as a fetch
  reply must come from the host's own user;
- **what it is**: it is sealed to the store's key and bound to its VM, kind, token and
  hash (see ``keeper_shared.sealing.state_blobs``), like a fetch reply's blob; one moved
  to another VM, kind or version, or altered, does not open;
- **whether it may be written**: it reaches the same writer, which verifies its content
  against its hash and writes it through the same fenced script (the VM's placement host
  and epoch, and a token newer than the head), after the same placement and superseded
  checks in ``StateService.on_state_changed``.

What the push adds is only that the host chose which version to send; so it could with a
fetch (the reply is whatever the host holds), and the fence still refuses an older one.
A blob that does not open (sealed to a key the store no longer or never held, or altered)
is not an error of the event: the change is pulled as it would have been without it.
"""

from __future__ import annotations

from collections.abc import Sequence

import structlog

from keeper_shared.messages.state import FetchedVmState, StateChange
from keeper_shared.messages.types import StateBlob
from keeper_shared.observability import metrics
from keeper_shared.sealing.construction import SealingError
from keeper_shared.sealing.keys import SealingPrivateKeys
from keeper_shared.sealing.state_blobs import open_state_blob
from keeper_state_store.handlers.fetched_writer import FetchedStateWriter

log = structlog.get_logger(__name__)


class InlineStateIntake:
    """Opens inline blobs with the store's keys and persists them like fetched ones."""

    def __init__(self, keys: SealingPrivateKeys, writer: FetchedStateWriter) -> None:
        self._keys = keys
        self._writer = writer

    def open(
        self, host: str, changes: Sequence[StateChange]
    ) -> tuple[list[FetchedVmState], list[StateChange]]:
        """The opened state of each change that carries one, by VM, and the changes to pull:
        those announced by their hash alone, and those whose blob did not open."""
        by_vm: dict[str, list[StateBlob]] = {}
        to_pull: list[StateChange] = []
        for change in changes:
            if change.sealed is None:
                to_pull.append(change)
                continue
            try:
                blob = open_state_blob(change.vm_id, change.sealed, self._keys)
            except SealingError as error:
                metrics.INLINE_STATES.labels(outcome="pulled").inc()
                log.warning(
                    "inline state does not open, fetched instead",
                    vm_id=change.vm_id,
                    kind=change.kind.value,
                    from_host=host,
                    reason=str(error),
                )
                to_pull.append(change)
                continue
            metrics.INLINE_STATES.labels(outcome="opened").inc()
            by_vm.setdefault(change.vm_id, []).append(blob)
        opened = [FetchedVmState(vm_id=vm_id, blobs=blobs) for vm_id, blobs in by_vm.items()]
        return opened, to_pull

    async def persist(self, host: str, vm_states: list[FetchedVmState]) -> None:
        """Write them all in one call (so the write coalescer groups them with other hosts'
        writes); raises the first VM's failure, so the event is redelivered (what was
        written meanwhile is then a duplicate, skipped)."""
        if not vm_states:
            return
        results = await self._writer.persist(host, vm_states)
        for failure in results.values():
            if failure is not None:
                raise failure
