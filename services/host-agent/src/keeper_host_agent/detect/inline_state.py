"""Which announced changes carry their state inline, sealed to the store.

A change announced by its hash alone costs the store a ``state.fetch`` to the host and the
host a ``state.fetched`` reply: three messages per stored version, and with one VM per
host no fetch is ever shared by two changes. Small state (a TPM is a few KB compressed, an
OVMF NVRAM tens of KB) therefore travels in the announcement itself, sealed to the store's
key exactly as a fetch reply's blob is. What goes inline is the very blob whose hash and
token the change announces (sealed from the object the tracker built from its stable read,
never read again), so no later write can slip in between.

Hash-only (fetched as before): a blob above the per-blob cap, whatever would take the
event past its byte budget (the broker and the store then handle bounded messages), and
every state of a VM whose TPM is encrypted with a libvirt secret the keeper did not create
(the fetch ships that secret beside the state; without it the state opens nowhere else).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from keeper_host_agent.hypervisor.domain_xml import DomainStateLocation
from keeper_shared.messages.releases import UpgradeLevel
from keeper_shared.messages.sealed import SEAL_OVERHEAD_BYTES
from keeper_shared.messages.state import StateChange, StateChanged
from keeper_shared.messages.types import StateBlob
from keeper_shared.sealing.keys import SealingPublicKey
from keeper_shared.sealing.state_blobs import seal_state_blob

INLINE_SINCE = 3
"""The ``state.changed`` schema version that carries inline state."""
DEFAULT_EVENT_BYTES = 1024 * 1024
"""Default budget of sealed state per ``state.changed``: a batch of about a hundred TPM
states, or of NVRAMs as OVMF leaves them (mostly erased, so tens of KB compressed)."""
DEFAULT_BLOB_BYTES = 512 * 1024
"""Default cap of one inline blob once sealed."""


def inline_candidate(domain: DomainStateLocation, blob: StateBlob) -> StateBlob | None:
    """The blob a change of ``domain`` may carry inline: None when the VM's TPM state is
    encrypted with a foreign secret (only a fetch ships the secret with it)."""
    return None if domain.tpm_secret_uuid is not None else blob


def sealed_size(blob: StateBlob) -> int:
    """Bytes of ``blob``'s content once sealed (what the budgets count)."""
    return len(blob.compressed.get_secret_value()) + SEAL_OVERHEAD_BYTES


@dataclass(frozen=True, slots=True)
class InlineBudget:
    """How much sealed state one announcement carries."""

    per_event_bytes: int = DEFAULT_EVENT_BYTES
    """Sealed content of every inline blob of one ``state.changed`` together."""
    per_blob_bytes: int = DEFAULT_BLOB_BYTES
    """A blob larger than this once sealed is announced by its hash and fetched."""

    def __post_init__(self) -> None:
        if not 0 <= self.per_blob_bytes <= self.per_event_bytes:
            raise ValueError("the per-blob cap must lie between 0 and the per-event budget")


class StateInliner:
    """Seals what fits of a batch of changes to the store's key."""

    def __init__(self, store: SealingPublicKey, budget: InlineBudget) -> None:
        self._store = store
        self._budget = budget

    def inline(self, batch: Sequence[tuple[StateChange, StateBlob | None]]) -> list[StateChange]:
        """Each change of ``batch``, in order, with its blob sealed inline while the event's
        budget lasts; a change whose blob is None (not to be inlined) goes by its hash."""
        left = self._budget.per_event_bytes
        changes = []
        for change, blob in batch:
            size = 0 if blob is None else sealed_size(blob)
            if blob is None or size > min(left, self._budget.per_blob_bytes):
                changes.append(change)
                continue
            left -= size
            # Built anew, not copied, so the validator refuses a blob that is not the
            # version the change announces.
            changes.append(
                StateChange(
                    vm_id=change.vm_id,
                    kind=change.kind,
                    content_hash=change.content_hash,
                    size=change.size,
                    token=change.token,
                    sealed=seal_state_blob(change.vm_id, blob, self._store),
                )
            )
        return changes


def inliner_for(
    level: UpgradeLevel, store: SealingPublicKey, budget: InlineBudget
) -> StateInliner | None:
    """The inliner of an agent whose events go at ``level``; None when that level's
    ``state.changed`` has no place for inline state (capped at release 0.1.0, the store
    fetches every change, so sealing would be wasted work)."""
    if level.version_for(StateChanged.message_type) < INLINE_SINCE:
        return None
    return StateInliner(store, budget)
