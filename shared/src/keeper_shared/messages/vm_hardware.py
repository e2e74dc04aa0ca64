"""The disks and network interfaces of a VM spec, for the domain policy's demo template
builds. A VM manager that defines its own domain hands policy its XML instead
(``vm.place``'s ``domain_xml``); these cover what a small lab VM needs."""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

MAX_DISKS = 16
"""Disks per VM (target names `vda`..`vdp`, `sda`..`sdp`)."""

MAX_INTERFACES = 8
"""Network interfaces per VM."""

LIBVIRT_OBJECT_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$"
"""A libvirt network or host bridge name: plain words, safe in XML and logs."""

MAC_PATTERN = r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$"


def _image_path(value: str) -> str:
    """An absolute, normalised file path without control characters: the host opens it as
    the disk image, so no `..` may lead it elsewhere."""
    if any(ord(char) < 0x20 or ord(char) == 0x7F for char in value):
        raise ValueError("control characters in a disk path")
    path = PurePosixPath(value)
    if not path.is_absolute() or ".." in path.parts or str(path) != value:
        raise ValueError("a disk path must be absolute and normalised, without `..`")
    return value


ImagePath = Annotated[str, Field(min_length=2, max_length=1024), AfterValidator(_image_path)]


class DiskSpec(BaseModel):
    """One file-backed disk of the VM."""

    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)

    source: ImagePath = Field(description="The image file on the host (absolute path).")
    format: Literal["qcow2", "raw"] | None = Field(
        default=None, description="Image format; None: `qcow2` for a disk, `raw` for a CD-ROM."
    )
    bus: Literal["virtio", "sata", "scsi"] = Field(
        default="virtio",
        description="How the guest sees it: `virtio` (virtio-blk, `vdX`), `sata` (AHCI, "
        "`sdX`, for installers without virtio drivers) or `scsi` (virtio-scsi, `sdX`).",
    )
    cdrom: bool = Field(
        default=False, description="A read-only CD-ROM (an installer ISO) instead of a disk."
    )

    @property
    def image_format(self) -> str:
        """The format the image is read as."""
        if self.format is not None:
            return self.format
        return "raw" if self.cdrom else "qcow2"

    @model_validator(mode="after")
    def _cdrom_bus(self) -> DiskSpec:
        if self.cdrom and self.bus == "virtio":
            raise ValueError("a CD-ROM needs the sata or scsi bus (virtio-blk has none)")
        return self


class InterfaceSpec(BaseModel):
    """One network interface of the VM, on a libvirt network or a host bridge."""

    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)

    network: str | None = Field(
        default=None,
        pattern=LIBVIRT_OBJECT_NAME_PATTERN,
        description="A libvirt network (e.g. `default`); exactly one of network and bridge.",
    )
    bridge: str | None = Field(
        default=None,
        pattern=LIBVIRT_OBJECT_NAME_PATTERN,
        description="A host bridge (e.g. `br0`); exactly one of network and bridge.",
    )
    model: Literal["virtio", "e1000e", "rtl8139"] = Field(
        default="virtio", description="The NIC the guest sees."
    )
    mac: str | None = Field(
        default=None,
        pattern=MAC_PATTERN,
        description="MAC address (lower-case hex); libvirt picks one when None.",
    )

    @model_validator(mode="after")
    def _one_source(self) -> InterfaceSpec:
        if (self.network is None) == (self.bridge is None):
            raise ValueError("an interface names exactly one of network and bridge")
        return self
