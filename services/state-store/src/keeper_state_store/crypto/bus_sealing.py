"""The store's side of sealing on the bus: its own private keys, which open fetch replies,
and the hosts' public keys, which it seals ``vm.prepare`` and ``state.newest.read`` to.

A host's public key is learnt from its heartbeat, and only when the broker-validated AMQP
user of that heartbeat is the host (the same check that guards its state writes): a host
cannot make the store seal another host's state to its own key. The keys are kept in
Redis, so every replica seals to the same key whichever one took the heartbeat. A host
declared lost (``host.lost``) has its key dropped: nothing is sealed to it until it sends
heartbeats again as itself.
"""

from __future__ import annotations

import asyncio
import time
from typing import cast

import structlog
from redis.asyncio import Redis

from keeper_shared.messages.state import FetchedVmState, SealedVmState
from keeper_shared.redis_access.keys import host_sealing_keys_key
from keeper_shared.redis_access.results import awaited
from keeper_shared.sealing.keys import SealingPrivateKeys, SealingPublicKey
from keeper_shared.sealing.state_blobs import open_state_blob, open_tpm_secret

log = structlog.get_logger(__name__)

_KEY_POLL_S = 0.2
"""How often a restore waiting for a host's key looks again."""


def _text(value: object) -> str:
    # No decode_responses: the client returns bytes, whatever redis-py annotates.
    return bytes(cast(bytes, value)).decode()


class HostKeyUnknownError(Exception):
    """The store knows no sealing key of the host (no heartbeat with one since it started,
    or it was declared lost): nothing is sent to it."""


class HostSealingKeys:
    """The hosts' public sealing keys, in Redis."""

    def __init__(self, redis: Redis) -> None:
        self._redis = redis

    async def learn(self, host: str, public_key: SealingPublicKey) -> None:
        """Seal to ``public_key`` for ``host`` from now on (a rotation replaces the old one)."""
        text = public_key.to_text()
        previous = await awaited(self._redis.hget(host_sealing_keys_key(), host))
        if previous is not None and _text(previous) == text:
            return
        await awaited(self._redis.hset(host_sealing_keys_key(), host, text))
        log.info("host sealing key learnt", host=host, key_id=public_key.key_id)

    async def key_of(self, host: str) -> SealingPublicKey:
        """The key to seal ``host``'s state to, or `HostKeyUnknownError`."""
        value = await awaited(self._redis.hget(host_sealing_keys_key(), host))
        if value is None:
            raise HostKeyUnknownError(
                f"no sealing key known for host {host} (no heartbeat announcing one, or the "
                "host was declared lost): state is not sent to it"
            )
        return SealingPublicKey.from_text(_text(value))

    async def await_key_of(self, host: str, wait_s: float) -> SealingPublicKey:
        """`key_of`, waiting up to ``wait_s`` for a host whose key is not known yet (policy
        may place a VM on a host whose first heartbeat this store has not handled)."""
        deadline = time.monotonic() + wait_s
        while True:
            try:
                return await self.key_of(host)
            except HostKeyUnknownError:
                if time.monotonic() >= deadline:
                    raise
            await asyncio.sleep(_KEY_POLL_S)

    async def forget(self, host: str) -> None:
        """Seal nothing to ``host`` any more (it was declared lost)."""
        if await awaited(self._redis.hdel(host_sealing_keys_key(), host)):
            log.info("host sealing key dropped", host=host)


class StoreBusSealing:
    """What the store needs to seal and open state on the bus."""

    def __init__(self, own: SealingPrivateKeys, hosts: HostSealingKeys) -> None:
        self.own = own
        self.hosts = hosts

    def open_fetched(self, vm_states: list[SealedVmState]) -> list[FetchedVmState]:
        """The clear state of a fetch reply; `SealingError` when any of it does not open."""
        return [
            FetchedVmState(
                vm_id=vm_state.vm_id,
                blobs=[open_state_blob(vm_state.vm_id, blob, self.own) for blob in vm_state.blobs],
                tpm_secret=(
                    open_tpm_secret(vm_state.vm_id, vm_state.tpm_secret, self.own)
                    if vm_state.tpm_secret is not None
                    else None
                ),
            )
            for vm_state in vm_states
        ]
