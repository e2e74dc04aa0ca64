"""Settings every service shares; each service subclasses with its own env prefix."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class ServiceSettings(BaseSettings):
    """Connection and logging settings common to all services."""

    model_config = SettingsConfigDict(frozen=True, extra="ignore")

    amqp_url: str = Field(
        default="amqp://guest:guest@127.0.0.1:28672/",
        description="RabbitMQ URL; its user is the identity the broker validates.",
    )
    log_level: str = Field(default="INFO", description="Lowest level logged.")
    log_json: bool | None = Field(
        default=None, description="JSON lines; None means JSON unless stderr is a terminal."
    )
    shutdown_grace_s: float = Field(
        default=10.0, gt=0, description="How long SIGTERM waits for in-flight work."
    )
