"""Policy settings (environment prefix ``KEEPER_POLICY_``)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from keeper_shared.settings import ServiceSettings


class PolicySettings(ServiceSettings):
    """Rules and time bounds of the policy service."""

    model_config = SettingsConfigDict(env_prefix="KEEPER_POLICY_", frozen=True, extra="ignore")

    redis_url: str = Field(default="redis://127.0.0.1:28379/0", description="Redis URL.")
    retrieve_attempts: int = Field(
        default=3, ge=1, le=10, description="Retrievals tried before a destroy goes ahead anyway."
    )
    retrieve_timeout_s: float = Field(default=15.0, gt=0, description="Bound on one retrieval.")
    host_command_timeout_s: float = Field(
        default=60.0, gt=0, description="Bound on one host command (start, shutdown, undefine)."
    )
    host_lost_after_s: float = Field(
        default=30.0, gt=0, description="A host whose last heartbeat is older is lost."
    )
    ovmf_code: Path = Field(
        default=Path("/usr/share/OVMF/OVMF_CODE_4M.fd"), description="UEFI firmware code."
    )
    ovmf_vars_template: Path = Field(
        default=Path("/usr/share/OVMF/OVMF_VARS_4M.fd"), description="NVRAM template."
    )
    guest_os_tpm: dict[str, str] = Field(
        default_factory=lambda: {
            "windows-11": "required",
            "windows-2022": "required",
            "windows-10": "supported",
            "windows-8.1": "supported",
            "windows-2012": "supported",
            "windows-2016": "supported",
            "windows-2019": "supported",
            "rhel-7": "supported",
            "rhel-8": "supported",
            "rhel-9": "supported",
            "rhel-10": "supported",
            "debian-12": "supported",
            "ubuntu-24.04": "supported",
        },
        description="osinfo-style TPM support per guest OS; absent means unsupported.",
    )
