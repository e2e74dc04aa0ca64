"""Host agent settings (environment prefix ``KEEPER_HOST_``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator, model_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from keeper_host_agent.detect.inline_state import DEFAULT_BLOB_BYTES, DEFAULT_EVENT_BYTES
from keeper_host_agent.hook.settings import HookSettings
from keeper_shared.messages.adoption import AdoptionMode
from keeper_shared.messages.types import HOST_ID_PATTERN
from keeper_shared.runtime.settings import ServiceSettings, split_list
from keeper_shared.sealing.keys import SEALING_PUBLIC_KEY_PATTERN


class HostAgentSettings(ServiceSettings, HookSettings):
    """Everything one host agent needs to know about its host."""

    model_config = SettingsConfigDict(env_prefix="KEEPER_HOST_", frozen=True, extra="ignore")

    host_id: str = Field(pattern=HOST_ID_PATTERN, description="This host's id on the bus.")
    cluster: str = Field(
        default="default", max_length=64, description="The cluster this host belongs to."
    )
    libvirt_uri: str = Field(default="qemu:///system", description="libvirt connection URI.")
    swtpm_root: Path = Field(
        default=Path("/var/lib/libvirt/swtpm"), description="Where libvirt keeps swtpm state."
    )
    nvram_dir: Path = Field(
        default=Path("/var/lib/libvirt/qemu/nvram"),
        description="Where NVRAM files go when the domain XML names none.",
    )
    snapshot_dir: Path = Field(
        # Not libvirt's own snapshot directory (/var/lib/libvirt/qemu/snapshot/<name>/
        # holds its snapshot metadata); under /var/lib/libvirt/qemu for its file labels.
        default=Path("/var/lib/libvirt/qemu/memory-snapshots"),
        description="Where snapshots with memory keep their memory file "
        "(`<vm-uuid>/<snapshot>.mem`); it stays on this host until the snapshot is deleted.",
    )
    state_owner: str | None = Field(
        default=None, description="`user:group` swtpm runs as; None keeps the agent's own."
    )
    stability_window_s: float = Field(
        default=0.5, gt=0, le=1.0, description="Gap between the two reads that must agree."
    )
    rescan_interval_s: float = Field(
        default=5.0, gt=0, description="Stat-only safety-net rescan when inotify missed one."
    )
    heartbeat_interval_s: float = Field(default=5.0, gt=0, description="Heartbeat period.")
    inline_state_max_bytes: int = Field(
        default=0,
        ge=0,
        le=4 * 1024 * 1024,
        description="Opt-in: sealed state one `state.changed` carries inline, all its changes "
        "together (the store then stores it without fetching it back); changes beyond it "
        "are announced by their hash and fetched. 0 (the default) announces every change by "
        "its hash alone and the store pulls it, as the design describes; "
        f"{DEFAULT_EVENT_BYTES} is what the benchmarks measure. At most 4 MiB, so that an "
        "event stays well within a message's 8 MiB once base64-encoded.",
    )
    inline_blob_max_bytes: int = Field(
        default=DEFAULT_BLOB_BYTES,
        ge=0,
        description="A single blob larger than this once sealed (compressed, + 16 bytes) is "
        "never inlined but fetched: a large NVRAM does not crowd the small TPM states out of "
        "the event. At most `inline_state_max_bytes` when that is set.",
    )
    generation_mark_file: Path | None = Field(
        default=None,
        description="Where the agent keeps the high-water mark of the generations it hands "
        "out, so a restart after the clock was set back never writes below what the store "
        "holds (its writes would be refused as stale until the clock caught up). The "
        "systemd unit sets /var/lib/vtpm-keeper/generation; unset keeps no mark.",
    )
    sealing_key_file: Path = Field(
        description="This host's X25519 private key (PKCS#8 PEM, mode 0600), made by the "
        "agent on its first start when absent; the store seals the state it sends here to "
        "its public key. The systemd unit sets /var/lib/vtpm-keeper/sealing.key."
    )
    previous_sealing_key_files: Annotated[list[Path], NoDecode] = Field(
        default_factory=list,
        description="Earlier private keys of this host, comma-separated: they open what was "
        "sealed to them before a rotation (a `vm.prepare` still queued).",
    )
    _split_previous_sealing = field_validator("previous_sealing_key_files", mode="before")(
        split_list
    )
    store_sealing_key: str = Field(
        pattern=SEALING_PUBLIC_KEY_PATTERN,
        description="The store's X25519 public key (base64), pinned: fetch replies are sealed "
        "to it (`python -m keeper_shared.sealing.keygen --public <store key file>` prints it).",
    )
    command_senders: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="The AMQP users whose commands this host carries out, comma-separated: "
        "the state store's and policy's users. Any other user's command (an integrator's or "
        "the CLI's, which may write the commands exchange and so address any queue on it) is "
        "refused and dead-lettered. Empty checks nothing: only where every service shares "
        "one user (development).",
    )
    _split_command_senders = field_validator("command_senders", mode="before")(split_list)
    adopt: AdoptionMode = Field(
        default=AdoptionMode.ALL,
        description="Which TPM/UEFI domains vTPM Keeper did not place policy adopts by itself: "
        "`all`, `marked` (only those whose metadata carries `<keeper:adopt/>`) or `none` (only "
        "on `keeper vm adopt`). `all` by default: a TPM left unprotected is the loss the "
        "keeper exists to prevent, and adopting only reads the state and stamps an epoch in "
        "the metadata (the domain is never redefined, restarted or undefined for it).",
    )

    @model_validator(mode="after")
    def _blob_cap_within_event_budget(self) -> HostAgentSettings:
        if 0 < self.inline_state_max_bytes < self.inline_blob_max_bytes:
            raise ValueError(
                "inline_blob_max_bytes must not exceed inline_state_max_bytes "
                f"({self.inline_blob_max_bytes} > {self.inline_state_max_bytes})"
            )
        return self
