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
  checks in ``StateService._check``.

What the push adds is only that the host chose which version to send; so it could with a
fetch (the reply is whatever the host holds), and the fence still refuses an older one.
A blob that does not open (sealed to a key the store no longer or never held, or altered)
is not an error of the event: the change is pulled as it would have been without it.
"""

from __future__ import annotations

import structlog

from keeper_shared.messages.state import StateChange
from keeper_shared.messages.types import StateBlob
from keeper_shared.observability import metrics
from keeper_shared.sealing.construction import SealingError
from keeper_shared.sealing.keys import SealingPrivateKeys
from keeper_shared.sealing.state_blobs import open_state_blob

log = structlog.get_logger(__name__)


class InlineStateIntake:
    """Opens inline blobs with the store's keys; the store persists them like fetched ones."""

    def __init__(self, keys: SealingPrivateKeys) -> None:
        self._keys = keys

    def open(self, host: str, change: StateChange) -> StateBlob | None:
        """The state ``change`` carries, opened; None when it is to be pulled: announced by
        its hash alone, or its blob did not open."""
        if change.sealed is None:
            return None
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
            return None
        metrics.INLINE_STATES.labels(outcome="opened").inc()
        return blob
