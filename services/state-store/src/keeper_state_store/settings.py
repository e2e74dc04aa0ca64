"""State store settings (environment prefix ``KEEPER_STORE_``)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from keeper_shared.settings import ServiceSettings


class StateStoreSettings(ServiceSettings):
    """Where the store keeps state and how it treats it."""

    model_config = SettingsConfigDict(env_prefix="KEEPER_STORE_", frozen=True, extra="ignore")

    redis_url: str = Field(default="redis://127.0.0.1:28379/0", description="Redis URL.")
    kek_file: Path = Field(description="Key-encryption key file (mode 0600); never in Redis.")
    history_depth: int = Field(default=10, ge=1, le=1000, description="Versions kept per kind.")
    allow_volatile_redis: bool = Field(
        default=False,
        description="Start against a Redis without the append-only file (tests only).",
    )
    fetch_timeout_s: float = Field(default=10.0, gt=0, description="Wait for a host's fetch reply.")
    prepare_timeout_s: float = Field(default=30.0, gt=0, description="Wait for a host's prepare.")
    replica_id: str = Field(default="store-1", max_length=64, description="Names this replica.")
