"""Which TPM is the VM's own, and which version a restore hands out (invariant 10).

The store records, per VM, a trust record beside the TPM history
(``state_identity_trust_key``) and each version's identity fingerprint
(``state_identities_key``, see `keeper_state_store.identity.fingerprint`):

- ``accepted``: the fingerprint of the VM's own TPM: the first one read for the VM (its
  first start, a clone's or an import's copy), or the one someone accepted, or the one of
  a version a restore asked for;
- ``good``: the newest version with that identity;
- while a reset is pending: ``reset`` (the first version of another TPM), its
  ``reset_identity`` ('' when unreadable) and ``restore`` (the version of the VM's own
  TPM that restores hand out instead of the newest; kept beyond the history depth).

persist.lua decides each TPM write against this record in the same script as the fenced
write (`TrustVerdict`); tpm_trust.lua changes it on request. Versions written before
identities were recorded, and VMs whose TPM identity was never read, are not judged.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from importlib import resources

from redis.asyncio import Redis

from keeper_shared.messages.types import StateKind
from keeper_shared.redis_access.keys import (
    state_head_key,
    state_identities_key,
    state_identity_trust_key,
)
from keeper_shared.redis_access.results import awaited
from keeper_state_store.storage.replication import NO_REPLICAS, ReplicaQuorum, run_replicated


class TrustVerdict(enum.StrEnum):
    """What persist.lua found about a stored TPM version's identity."""

    NOT_JUDGED = ""
    """Not a TPM write, or written without an identity (an older writer)."""
    UNKNOWN = "unknown"
    """No identity of the VM's TPM is known yet: nothing to compare with."""
    SAME = "same"
    """The VM's own TPM."""
    RESET = "reset"
    """Another TPM (or an unreadable one where the VM's own was read): flagged now."""
    PENDING = "pending"
    """Not the VM's own, and a reset is already pending: still flagged."""
    OWN_BACK = "own_back"
    """The VM's own TPM again, after a reset: the reset is over."""


@dataclass(frozen=True)
class TrustOutcome:
    """persist.lua's verdict on a stored TPM version, and the trust record after it."""

    verdict: TrustVerdict
    restore_version: int | None
    """The version restores hand out while a reset is pending; None when none is."""
    reset_version: int | None
    """The first version of the pending reset (with `TrustVerdict.OWN_BACK`, of the reset
    that just ended); None when none is."""

    @classmethod
    def from_reply(cls, verdict: bytes, restore: bytes, reset: bytes) -> TrustOutcome:
        """Parse the last three fields of persist.lua's ``stored`` reply."""
        return cls(
            TrustVerdict(verdict.decode()),
            int(restore) if restore else None,
            int(reset) if reset else None,
        )


@dataclass(frozen=True)
class PendingReset:
    """A TPM reset found at persist time and not accepted yet."""

    reset_version: int
    restore_version: int
    identity: str | None
    previous_identity: str | None


@dataclass(frozen=True)
class Trusted:
    """What tpm_trust.lua did: the version whose identity is now the VM's own."""

    version: int
    newest: int
    cleared_reset: int | None
    """The first version of the reset that was pending; None when none was."""


class TpmTrust:
    """Reads and changes the trust record of VMs' TPMs."""

    def __init__(self, redis: Redis, replicas: ReplicaQuorum = NO_REPLICAS) -> None:
        self._redis = redis
        self._replicas = replicas
        script = resources.files(__package__).joinpath("tpm_trust.lua").read_text()
        self._trust = redis.register_script(script)

    async def pending_reset(self, vm_id: str) -> PendingReset | None:
        """The VM's pending reset, None when there is none."""
        fields = await awaited(
            self._redis.hmget(
                state_identity_trust_key(vm_id, StateKind.TPM),
                ["reset", "restore", "reset_identity", "accepted"],
            )
        )
        reset, restore, identity, accepted = fields
        if reset is None or restore is None:
            return None
        return PendingReset(
            reset_version=int(reset),
            restore_version=int(restore),
            identity=identity.decode() if identity else None,
            previous_identity=accepted.decode() if accepted else None,
        )

    async def restorable_versions(self, vm_id: str) -> dict[StateKind, int]:
        """The version of each kind a restore, the QEMU hook, a clone or an export hands
        out by default: the newest, except a TPM whose reset is pending, whose own newest
        version is handed out instead (kinds without stored state are left out)."""
        # A block: a Redis Cluster transaction hands its connection back only on reset.
        async with self._redis.pipeline(transaction=True) as pipe:
            for kind in StateKind:
                pipe.hget(state_head_key(vm_id, kind), "version")
            pipe.hget(state_identity_trust_key(vm_id, StateKind.TPM), "restore")
            *heads, restore = await pipe.execute()
        found = {
            kind: int(head) for kind, head in zip(StateKind, heads, strict=True) if head is not None
        }
        if restore is not None and StateKind.TPM in found:
            found[StateKind.TPM] = int(restore)
        return found

    async def accept_newest(self, vm_id: str) -> Trusted | None:
        """Make the newest TPM version the VM's own, ending a pending reset; None when the
        VM has no TPM stored."""
        return await self._run(vm_id, None, "accept")

    async def trust_restored(self, vm_id: str, version: int) -> Trusted | None:
        """A restore is sending ``version``: when it is known to be another TPM than the
        VM's own, it becomes the VM's own (someone asked for it); None when nothing
        changed."""
        return await self._run(vm_id, version, "if_other")

    async def _run(self, vm_id: str, version: int | None, mode: str) -> Trusted | None:
        keys = [
            state_head_key(vm_id, StateKind.TPM),
            state_identities_key(vm_id, StateKind.TPM),
            state_identity_trust_key(vm_id, StateKind.TPM),
        ]
        args = ["" if version is None else str(version), mode]
        # Replicated before it is reported: a failover must not bring a reset back.
        (reply,) = await run_replicated(
            self._redis,
            self._replicas,
            lambda pipe: self._trust(keys=keys, args=args, client=pipe),
        )
        if reply[0] != b"trusted":
            return None
        _, chosen, newest, cleared = reply
        return Trusted(
            version=int(chosen), newest=int(newest), cleared_reset=int(cleared) if cleared else None
        )
