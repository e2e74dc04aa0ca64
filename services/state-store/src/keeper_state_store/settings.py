"""State store settings (environment prefix ``KEEPER_STORE_``)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from keeper_shared.redis_access.connection import RedisSettings
from keeper_shared.runtime.settings import ServiceSettings


class StateStoreSettings(ServiceSettings, RedisSettings):
    """Where the store keeps state and how it treats it."""

    model_config = SettingsConfigDict(env_prefix="KEEPER_STORE_", frozen=True, extra="ignore")

    redis_min_replicas: int = Field(
        default=0,
        ge=0,
        le=16,
        description=(
            "Replicas that must hold a write (Redis WAIT) before it is acknowledged or "
            "announced; 0 does not wait (a single Redis)."
        ),
    )
    redis_replica_timeout_ms: int = Field(
        default=1000,
        ge=1,
        le=60000,
        description="How long one write waits for its replicas before it counts as not durable.",
    )
    kek_file: Path = Field(description="Key-encryption key file (mode 0600); never in Redis.")
    sealing_key_file: Path = Field(
        description="The store's X25519 private key (PKCS#8 PEM, mode 0600), shared by every "
        "replica: hosts seal fetch replies to its public key (`keeper-host-agent keygen` "
        "makes one and prints the public key hosts pin)."
    )
    previous_sealing_key_files: list[Path] = Field(
        default_factory=list,
        description="Earlier store sealing keys: they open replies sealed before a "
        "rotation, until none is in flight.",
    )
    history_depth: int = Field(default=10, ge=1, le=1000, description="Versions kept per kind.")
    allow_volatile_redis: bool = Field(
        default=False,
        description="Start against a Redis without the append-only file (tests only).",
    )
    fetch_timeout_s: float = Field(default=10.0, gt=0, description="Wait for a host's fetch reply.")
    prepare_timeout_s: float = Field(default=30.0, gt=0, description="Wait for a host's prepare.")
    host_key_wait_s: float = Field(
        default=10.0,
        ge=0,
        le=120,
        description="How long a restore waits for the sealing key of a host whose heartbeat "
        "this store has not handled yet (two default heartbeat intervals); then it fails.",
    )
    pull_batch_window_s: float = Field(
        default=0.005,
        ge=0,
        le=1.0,
        description=(
            "While fetches to a host are in flight, how long the next pull waits for others "
            "to share its fetch (a host with none in flight is fetched from at once)."
        ),
    )
    pull_batches_in_flight: int = Field(
        default=4,
        ge=1,
        le=64,
        description="Most batched fetches to one host in flight at once.",
    )
    events_prefetch: int = Field(
        default=1024,
        ge=1,
        le=4096,
        description=(
            "Most events (state.changed, heartbeats) one replica holds at once; the changes "
            "it works on are bounded apart (changes_in_flight). An event is acknowledged "
            "after its writes, so this bounds the VMs in flight when every host announces "
            "one change at a time: at 128, a thousand hosts with a VM each had 128 VMs in "
            "flight where one host with all of them had a thousand, and each Redis pipeline "
            "carried a tenth of the writes (a third more CPU per version). Held events cost "
            "memory: a few KB each by hash, up to the hosts' inline budget each with inline "
            "state on."
        ),
    )
    changes_in_flight: int = Field(
        default=1000,
        ge=1,
        le=100_000,
        description=(
            "Most announced changes one replica opens, verifies and writes at once, in "
            "arrival order (the prefetch counts events, which carry one change or hundreds). "
            "About what two shared write pipelines take: in a boot storm, ten thousand at "
            "once kept the event loop so far behind that confirms were read after their "
            "bound and whole events were redone."
        ),
    )
    pull_batch_max_vms: int = Field(
        default=32,
        ge=1,
        le=256,
        description="Most VMs in one fetch (bounds the reply: ~6 KB per VM, more for 4M NVRAM).",
    )
    verify_host_identity: bool = Field(
        default=True,
        description=(
            "A host's events and fetch replies must carry the broker-validated AMQP user "
            "named after the host (per-host RabbitMQ users). Off only where every service "
            "shares one user, as on the local demo stack."
        ),
    )
    replica_id: str = Field(default="store-1", max_length=64, description="Names this replica.")

    # --- Key rotation and scrubbing -------------------------------------------------------
    previous_kek_files: list[Path] = Field(
        default_factory=list,
        description="Earlier key-encryption key files: they unwrap data keys, never wrap.",
    )
    rewrap_on_start: bool = Field(
        default=True,
        description="With previous KEKs given, rewrap their data keys with the current KEK "
        "in the background at start.",
    )
    scrub_enabled: bool = Field(default=True, description="Verify stored versions in background.")
    scrub_versions_per_second: float = Field(
        default=5.0, gt=0, le=1000, description="Most versions this replica verifies per second."
    )
    scrub_interval_s: float = Field(
        default=86400.0, gt=0, description="A version verified this recently is not re-verified."
    )
    scrub_pass_pause_s: float = Field(
        default=60.0, gt=0, description="Pause between two scrub passes over the keyspace."
    )
    scrub_swtpm: bool = Field(
        default=True, description="Load TPM versions into a throwaway swtpm when installed."
    )
    scrub_temp_dir: Path | None = Field(
        default=None, description="Where throwaway swtpm state goes (system temp dir if unset)."
    )
