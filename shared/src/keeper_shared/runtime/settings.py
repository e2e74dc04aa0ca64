"""Settings every service shares; each service subclasses with its own env prefix."""

from __future__ import annotations

import json
from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


def split_list(value: object) -> object:
    """Let a list setting come from the environment as ``a,b,c`` (or as a JSON list)."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            return json.loads(text)
        return [item.strip() for item in text.split(",") if item.strip()]
    return value


class ServiceSettings(BaseSettings):
    """Connection and logging settings common to all services."""

    model_config = SettingsConfigDict(frozen=True, extra="ignore")

    amqp_url: str = Field(
        default="amqp://guest:guest@127.0.0.1:28672/",
        description="RabbitMQ URL; its user is the identity the broker validates.",
    )
    amqp_urls: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description=(
            "The URLs of a RabbitMQ cluster's nodes, comma-separated, all with the same user: "
            "the service connects to the first that answers and moves to another when its "
            "node goes away. When set, amqp_url is not used."
        ),
    )
    log_level: str = Field(default="INFO", description="Lowest level logged.")
    log_json: bool | None = Field(
        default=None, description="JSON lines; None means JSON unless stderr is a terminal."
    )
    shutdown_grace_s: float = Field(
        default=10.0, gt=0, description="How long SIGTERM waits for in-flight work."
    )

    _split_amqp_urls = field_validator("amqp_urls", mode="before")(split_list)

    @property
    def amqp_endpoints(self) -> list[str]:
        """The broker URLs to try, in order: ``amqp_urls``, else ``amqp_url`` alone."""
        return list(self.amqp_urls) or [self.amqp_url]
