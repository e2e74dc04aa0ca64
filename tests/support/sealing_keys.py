"""Sealing keys for tests: the store's and a host's, in memory or in files, and a host's
public key registered with a store as its heartbeat would."""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from redis.asyncio import Redis

from keeper_shared.redis_access.keys import host_sealing_keys_key
from keeper_shared.redis_access.results import awaited
from keeper_shared.sealing.keys import (
    SealingPrivateKeys,
    SealingPublicKey,
    create_private_key_file,
    load_private_key,
)
from keeper_state_store.crypto.bus_sealing import HostSealingKeys, StoreBusSealing


def new_keys() -> SealingPrivateKeys:
    """A fresh key pair held in memory."""
    return SealingPrivateKeys(X25519PrivateKey.generate())


def key_file(path: Path) -> SealingPublicKey:
    """Write a new private key to ``path`` (mode 0600) and return its public key."""
    return SealingPublicKey(create_private_key_file(path).public_key())


def store_sealing(redis: Redis, own: SealingPrivateKeys | None = None) -> StoreBusSealing:
    """A store's sealing: ``own`` (or fresh) keys, the hosts' keys in ``redis``."""
    return StoreBusSealing(own or new_keys(), HostSealingKeys(redis))


async def register_host(sealing: StoreBusSealing, host_id: str, host: SealingPublicKey) -> None:
    """Have the store seal to ``host`` for ``host_id``, as after that host's heartbeat."""
    await sealing.hosts.learn(host_id, host)


async def forget_hosts(redis: Redis, *host_ids: str) -> None:
    """Remove the hosts' keys a test registered (the hash is shared by every test)."""
    if host_ids:
        await awaited(redis.hdel(host_sealing_keys_key(), *host_ids))


def host_key_environment(directory: Path, store: SealingPublicKey) -> dict[str, str]:
    """The environment of a host agent process whose key is made in ``directory`` on first
    start and that seals fetch replies to ``store``."""
    return {
        "KEEPER_HOST_SEALING_KEY_FILE": str(directory / "host-sealing.key"),
        "KEEPER_HOST_STORE_SEALING_KEY": store.to_text(),
    }


def public_key_of(private_key_file: Path) -> SealingPublicKey:
    """The public half of a key file (a host's, read on the same machine by a test that
    crafts commands for that host)."""
    return SealingPublicKey(load_private_key(private_key_file).public_key())
