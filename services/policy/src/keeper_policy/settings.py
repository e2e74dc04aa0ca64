"""Policy settings (environment prefix ``KEEPER_POLICY_``)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from keeper_policy.tpm.guest_os import DEFAULT_GUEST_OS_ALIASES, DEFAULT_GUEST_OS_RULES, GuestOsRule
from keeper_policy.tpm.profile_choice import OLDEST_HOST
from keeper_shared.redis_access.connection import RedisSettings
from keeper_shared.runtime.settings import ServiceSettings


class PolicySettings(ServiceSettings, RedisSettings):
    """Rules and time bounds of the policy service."""

    model_config = SettingsConfigDict(env_prefix="KEEPER_POLICY_", frozen=True, extra="ignore")

    retrieve_attempts: int = Field(
        default=3, ge=1, le=10, description="Retrievals tried before a destroy goes ahead anyway."
    )
    retrieve_timeout_s: float = Field(default=15.0, gt=0, description="Bound on one retrieval.")
    host_command_timeout_s: float = Field(
        default=60.0, gt=0, description="Bound on one host command (start, shutdown, undefine)."
    )
    verify_host_identity: bool = Field(
        default=True,
        description="A host's events (heartbeats, starts, stops, discoveries, stranded "
        "states) and its `vm.claim` must come from the broker-validated AMQP user named after "
        "the host (per-host RabbitMQ users); others are dead-lettered or refused. Off only "
        "where every service shares one user (development).",
    )
    host_lost_after_s: float = Field(
        default=30.0, gt=0, description="A host whose last heartbeat is older is lost."
    )
    liveness_check_interval_s: float = Field(
        default=2.0, gt=0, description="How often each replica looks for lost hosts."
    )
    workflow_lease_s: float = Field(
        default=10.0,
        gt=0,
        description="A workflow whose runner stopped renewing its lease for this long is "
        "resumed by another replica.",
    )
    workflow_sweep_interval_s: float = Field(
        default=2.0, gt=0, description="How often each replica looks for orphaned workflows."
    )
    migration_window_s: float = Field(
        default=300.0,
        gt=0,
        description="How long one half of a migration (source stopped, destination started) "
        "waits for the other.",
    )
    ovmf_code: Path = Field(
        default=Path("/usr/share/OVMF/OVMF_CODE_4M.fd"), description="UEFI firmware code."
    )
    ovmf_vars_template: Path = Field(
        default=Path("/usr/share/OVMF/OVMF_VARS_4M.fd"), description="NVRAM template."
    )
    ovmf_secure_code: Path = Field(
        default=Path("/usr/share/OVMF/OVMF_CODE_4M.secboot.fd"),
        description="UEFI firmware code for Secure Boot VMs.",
    )
    ovmf_secure_vars_template: Path = Field(
        default=Path("/usr/share/OVMF/OVMF_VARS_4M.ms.fd"),
        description="NVRAM template with the Microsoft keys enrolled, for Secure Boot VMs.",
    )
    tpm_profiles: dict[str, str] = Field(
        default_factory=dict,
        description="Per cluster, the libtpms profile new TPMs are made with: a profile name "
        "(`null`, `default-v1`, `default-v2`) pinned with libvirt's `<profile>`, or "
        f"`{OLDEST_HOST}` (the default for a cluster not named): the newest profile of the "
        "oldest libtpms in the cluster, where every host can pin one.",
    )
    guest_os_rules: list[GuestOsRule] = Field(
        default_factory=lambda: list(DEFAULT_GUEST_OS_RULES),
        description="osinfo-style TPM support per OS family from a minimum version up; an OS "
        "no rule covers is unsupported.",
    )
    guest_os_aliases: dict[str, str] = Field(
        default_factory=lambda: dict(DEFAULT_GUEST_OS_ALIASES),
        description="Other spellings of guest OS ids (osinfo short ids) -> `<family>-<version>`.",
    )
