"""The API's settings, from ``KEEPER_API_*`` environment variables."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from keeper_shared.bus.topology import POLICY, STATE_STORE
from keeper_shared.redis_access.connection import RedisSettings


class ApiSettings(BaseSettings, RedisSettings):
    """Where the API listens, which bus it uses, who may call it, and the Redis (one, its
    Sentinels or a cluster, as the services find theirs: ``KEEPER_API_REDIS_URL`` as the
    API's own user ``keeper-api``, ``KEEPER_API_REDIS_SENTINELS``...) its operations'
    outcomes are kept in."""

    model_config = SettingsConfigDict(env_prefix="KEEPER_API_", frozen=True, extra="ignore")

    amqp_urls: Annotated[list[str], NoDecode] = Field(
        min_length=1,
        description="RabbitMQ node URLs, comma-separated (amqps://USER:PASSWORD@HOST:PORT/).",
    )
    tokens_file: Path = Field(description="Bearer tokens' SHA-256 with their roles.")
    listen_host: str = "127.0.0.1"
    listen_port: int = Field(default=28080, ge=0, le=65535)
    timeout_s: float = Field(default=120.0, gt=0, le=3600)
    store_sealing_key: str | None = Field(
        default=None, description="The store's public sealing key, for export and import."
    )
    stale_after_s: float = Field(
        default=3600.0, gt=0, description="The console highlights newest state older than this."
    )
    max_body_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)
    operation_ttl_s: int = Field(default=86400, ge=60)
    operation_heartbeat_s: float = Field(
        default=5.0,
        gt=0,
        le=60,
        description="How often a replica renews the liveness of an operation it carries out; "
        "three missed and a poll reports it interrupted.",
    )
    store_target: str = STATE_STORE
    policy_target: str = POLICY

    @field_validator("amqp_urls", mode="before")
    @classmethod
    def _split(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value
