"""Redis key names, in one place. Every key of a VM carries the hash tag ``{vm_id}`` so a
VM's keys live in one Redis Cluster slot and one Lua script may touch them all."""

from __future__ import annotations

from keeper_shared.messages.types import StateKind

PREFIX = "keeper"


def placement_key(vm_id: str) -> str:
    """Hash: host, epoch (written by policy, read by the store's fencing check)."""
    return f"{PREFIX}:{{{vm_id}}}:placement"


def vm_record_key(vm_id: str) -> str:
    """Hash: the registered VM spec and its approved TPM element (policy)."""
    return f"{PREFIX}:{{{vm_id}}}:vm"


def data_key_key(vm_id: str) -> str:
    """String: the VM's data key, wrapped by the key-encryption key."""
    return f"{PREFIX}:{{{vm_id}}}:dek"


def tpm_secret_key(vm_id: str) -> str:
    """String: JSON {uuid, sealed} of the libvirt secret the VM's TPM state is encrypted
    with; the value sealed under the VM's data key, never in clear."""
    return f"{PREFIX}:{{{vm_id}}}:tpm-secret"


def state_head_key(vm_id: str, kind: StateKind) -> str:
    """Hash: newest stored version, its fencing token and hash."""
    return f"{PREFIX}:{{{vm_id}}}:{kind.value}:head"


def state_blobs_key(vm_id: str, kind: StateKind) -> str:
    """Hash: version number -> encrypted compressed content."""
    return f"{PREFIX}:{{{vm_id}}}:{kind.value}:blobs"


def state_meta_key(vm_id: str, kind: StateKind) -> str:
    """Hash: version number -> packed metadata (hash, size, token, host, time, origin)."""
    return f"{PREFIX}:{{{vm_id}}}:{kind.value}:meta"


def state_history_key(vm_id: str, kind: StateKind) -> str:
    """List: version numbers kept, oldest first."""
    return f"{PREFIX}:{{{vm_id}}}:{kind.value}:history"


def state_flags_key(vm_id: str, kind: StateKind) -> str:
    """Hash: version number -> JSON verification record of the scrubber (see ScrubFlag)."""
    return f"{PREFIX}:{{{vm_id}}}:{kind.value}:flags"


def state_pinned_blobs_key(vm_id: str, kind: StateKind) -> str:
    """Hash: version number -> encrypted content, copied here while a snapshot pins it.

    A copy beside the history (not a mark in it) keeps the history trim in persist.lua
    simple: it may drop any version it likes, a pinned one survives here."""
    return f"{PREFIX}:{{{vm_id}}}:{kind.value}:pinned-blobs"


def state_pinned_meta_key(vm_id: str, kind: StateKind) -> str:
    """Hash: version number -> packed metadata of a pinned version (as in the meta hash)."""
    return f"{PREFIX}:{{{vm_id}}}:{kind.value}:pinned-meta"


def state_identities_key(vm_id: str, kind: StateKind) -> str:
    """Hash: version number -> fingerprint of the TPM identity the store read when it
    persisted that version (TPM only; absent when it could not be read). Trimmed with the
    history."""
    return f"{PREFIX}:{{{vm_id}}}:{kind.value}:identities"


def state_identity_trust_key(vm_id: str, kind: StateKind) -> str:
    """Hash: which TPM identity is the VM's own, and a reset found at persist time:
    ``accepted`` (fingerprint), ``good`` (newest version with it), and while a TPM with
    another identity is unaccepted, ``reset`` (its first version), ``reset_identity``
    (its fingerprint, '' when unreadable) and ``restore`` (the version restores hand out
    instead of the newest). See ``keeper_state_store.storage.tpm_trust``."""
    return f"{PREFIX}:{{{vm_id}}}:{kind.value}:identity-trust"


def kind_state_keys(vm_id: str, kind: StateKind) -> list[str]:
    """Every key holding stored state of one kind (blobs and pinned blobs first): what
    deleting a VM's state deletes."""
    return [
        state_blobs_key(vm_id, kind),
        state_pinned_blobs_key(vm_id, kind),
        state_head_key(vm_id, kind),
        state_meta_key(vm_id, kind),
        state_history_key(vm_id, kind),
        state_flags_key(vm_id, kind),
        state_pinned_meta_key(vm_id, kind),
        state_identities_key(vm_id, kind),
        state_identity_trust_key(vm_id, kind),
    ]


def snapshots_key(vm_id: str) -> str:
    """Hash: snapshot id -> JSON {created_at, versions: {kind: version}}."""
    return f"{PREFIX}:{{{vm_id}}}:snapshots"


def hosts_key() -> str:
    """Hash: host id -> JSON of its last heartbeat (policy)."""
    return f"{PREFIX}:hosts"


def host_sealing_keys_key() -> str:
    """Hash: host id -> the X25519 public key (base64) the store seals that host's state
    to, as the host last announced it in a heartbeat (the store's)."""
    return f"{PREFIX}:host-sealing-keys"


def scrub_lock_key(vm_id: str) -> str:
    """String with a TTL: which scrubber replica is verifying the VM right now."""
    return f"{PREFIX}:{{{vm_id}}}:scrub-lock"


def shard_barrier_key(tag: str) -> str:
    """`replication_barrier_key` of one Redis Cluster shard: the store picks ``tag`` so the
    key falls in a slot that shard serves (WAIT is per shard there)."""
    return f"{PREFIX}:{{{tag}}}:replication-barrier"


def replication_barrier_key() -> str:
    """A counter the store bumps after each state write it waits for replicas on: Redis
    WAIT covers only writes made on its own connection, and a write the store found
    already done (a duplicate) made none."""
    return f"{PREFIX}:replication-barrier"
