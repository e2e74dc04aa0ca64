"""The host's sealing keys: its own private keys (which open ``vm.prepare`` and the store's
``state.newest.read``), and the store's pinned public key (which it seals fetch replies to).
"""

from __future__ import annotations

from dataclasses import dataclass

from keeper_host_agent.settings import HostAgentSettings
from keeper_shared.sealing.keys import (
    SealingPrivateKeys,
    SealingPublicKey,
    load_or_create_private_key,
    load_private_key,
)


@dataclass(frozen=True, slots=True)
class HostSealingKeys:
    """What one host agent seals to and opens with."""

    own: SealingPrivateKeys
    store: SealingPublicKey

    @classmethod
    def from_settings(cls, settings: HostAgentSettings) -> HostSealingKeys:
        """Load the host's keys (making its current one on first start) and the store's."""
        current = load_or_create_private_key(settings.sealing_key_file)
        previous = [load_private_key(path) for path in settings.previous_sealing_key_files]
        return cls(
            SealingPrivateKeys(current, previous),
            SealingPublicKey.from_text(settings.store_sealing_key),
        )
