"""Host facts: heartbeats with inventory and capabilities."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from keeper_shared.messages.envelope import register_downcaster, register_upcaster
from keeper_shared.messages.host_fact import HostFact
from keeper_shared.messages.releases import CURRENT_RELEASE, RELEASE_PATTERN
from keeper_shared.messages.types import HOST_ID_PATTERN, ContentHash, HostId, VmId
from keeper_shared.sealing.keys import SEALING_PUBLIC_KEY_PATTERN


class HostCapabilities(BaseModel):
    """What a host can run, as it found out itself."""

    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)

    swtpm_version: str | None = Field(description="swtpm version, None when not installed.")
    libtpms_version: str | None = Field(
        default=None,
        max_length=32,
        description="libtpms version (the TPM swtpm emulates; it decides which TPM state "
        "formats the host loads), None when not installed or not reported.",
    )
    libvirt_version: str = Field(description="libvirt library version.")
    architectures: list[str] = Field(description="Guest architectures the host can run.")
    uefi_firmware: bool = Field(description="OVMF (or another UEFI firmware) is installed.")
    tpm_secrets: bool = Field(
        default=False,
        description="libvirt on the host keeps secrets (it has a secret driver), which a VM "
        "whose TPM state is encrypted needs.",
    )
    kvm: bool = Field(
        default=False,
        description="libvirt on the host runs guests of its architecture under KVM (its "
        "capabilities list a `kvm` domain type) and, on x86, that KVM emulates SMM (UEFI "
        "with Secure Boot needs it; some nested KVMs lack it); policy's template then asks "
        "for `type='kvm'` instead of QEMU's emulation.",
    )


class VmInventoryEntry(BaseModel):
    """One VM as its host currently sees it."""

    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)

    vm_id: VmId = Field(description="The VM.")
    epoch: int = Field(ge=0, description="Its placement epoch on this host.")
    tpm_hash: ContentHash | None = Field(description="Hash of its stable TPM state, if any.")
    nvram_hash: ContentHash | None = Field(description="Hash of its stable NVRAM, if any.")


class HostHeartbeat(HostFact):
    """Sent every few seconds; missing heartbeats make a host lost."""

    message_type = "host.heartbeat"
    schema_version = 5

    host: HostId = Field(description="The host.")
    interval_s: float = Field(gt=0, description="How often this host sends a heartbeat.")
    capabilities: HostCapabilities = Field(description="What it can run.")
    vms: list[VmInventoryEntry] = Field(description="The TPM/UEFI VMs it holds.")
    cluster: str = Field(
        default="default",
        pattern=HOST_ID_PATTERN,
        description="The cluster the host belongs to (TPM approval checks a cluster's hosts); "
        "hosts that name none are in `default`.",
    )
    sealing_key: str | None = Field(
        default=None,
        pattern=SEALING_PUBLIC_KEY_PATTERN,
        description="The host's current X25519 public key (base64), which the store seals "
        "the state it sends this host to; believed only from the host's own broker user.",
    )
    release: str = Field(
        default=CURRENT_RELEASE,
        pattern=RELEASE_PATTERN,
        description="The keeper release the agent runs, and so the schema version of each "
        "message it reads: policy and the store send their commands to this host at that "
        "release's versions during a rolling upgrade (see docs/upgrades.md); by default the "
        "release of the code that builds the heartbeat.",
    )


@register_upcaster(HostHeartbeat.message_type, 1)
def _heartbeat_v1(data: dict[str, Any]) -> dict[str, Any]:
    """v1 capabilities predate ``tpm_secrets``: such a host is not trusted with secrets."""
    return data


@register_upcaster(HostHeartbeat.message_type, 2)
def _heartbeat_v2(data: dict[str, Any]) -> dict[str, Any]:
    """v2 capabilities predate ``kvm``: such a host gets the template's emulated domain."""
    return data


@register_upcaster(HostHeartbeat.message_type, 3)
def _heartbeat_v3(data: dict[str, Any]) -> dict[str, Any]:
    """v3 predates ``libtpms_version`` and ``sealing_key``: such a host is taken to load only
    the oldest TPM state format, and no state is sealed to it, so none is sent."""
    return data


@register_upcaster(HostHeartbeat.message_type, 4)
def _heartbeat_v4(data: dict[str, Any]) -> dict[str, Any]:
    """v4 predates ``release``: only release 0.1.0 sent v4 heartbeats."""
    return {**data, "release": "0.1.0"}


@register_downcaster(HostHeartbeat.message_type, 5)
def _heartbeat_v5_as_v4(data: dict[str, Any]) -> dict[str, Any]:
    """To a receiver of release 0.1.0: it sends this host what it knows (0.1.0's versions)."""
    return {name: value for name, value in data.items() if name != "release"}
