"""The host agent's settings for the QEMU hook (environment prefix ``KEEPER_HOST_``), apart
so ``install-hook`` reads them without the rest of an agent's configuration."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_HOOK_SOCKET = Path("/run/keeper/host-agent.sock")


class HookSettings(BaseSettings):
    """Where the hook finds the agent, and how the agent answers it."""

    model_config = SettingsConfigDict(env_prefix="KEEPER_HOST_", frozen=True, extra="ignore")

    hook_socket: Path | None = Field(
        default=None,
        description="The Unix socket libvirt's QEMU hook asks (root only), e.g. "
        f"{DEFAULT_HOOK_SOCKET}; None serves no hook.",
    )
    hook_fail_open: bool = Field(
        default=False,
        description="Let a start go on (logged) when the VM's stored state cannot be put in "
        "place, instead of refusing it.",
    )
    hook_prepare_timeout_s: float = Field(
        default=30.0,
        gt=0,
        description="Bound on asking policy and the store before a start by another manager.",
    )
    hook_stop_timeout_s: float = Field(
        default=10.0,
        gt=0,
        description="Bound on having the final state stored when another manager stops a VM.",
    )
    hook_migration_window_s: float = Field(
        default=600.0,
        gt=0,
        description="How long an announced incoming migration keeps its start from restores.",
    )
