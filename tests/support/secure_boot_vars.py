"""The Secure Boot variables of an edk2 (OVMF) NVRAM file, read with virt-firmware's parser.

The enrolled keys are the authenticated variables PK and KEK (EFI global GUID) and db and
dbx (image security database GUID), each an EFI signature database: signature lists of
X.509 certificates or SHA-256 hashes. Whether Secure Boot is on is not stored as such: the
`SecureBoot` variable the guest reads is volatile, computed by the firmware at each boot
(a PK enrolled, so user mode, and `SecureBootEnable` set). What the NVRAM holds, and what
a restore must bring back, is the keys, `SecureBootEnable` and `CustomMode`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from virt.firmware.efi import guids
from virt.firmware.varstore.edk2 import Edk2VarStore

KEY_DATABASES: Mapping[str, str] = {
    "PK": guids.EfiGlobalVariable,
    "KEK": guids.EfiGlobalVariable,
    "db": guids.EfiImageSecurityDatabase,
    "dbx": guids.EfiImageSecurityDatabase,
}
"""The key variables and the vendor GUID each must have to be the real one."""

SWITCHES: Mapping[str, str] = {
    "SecureBootEnable": guids.EfiSecureBootEnableDisable,
    "CustomMode": guids.EfiCustomModeEnable,
}
"""The one-byte switches the firmware derives the Secure Boot state from, besides PK."""


@dataclass(frozen=True)
class Signature:
    """One entry of a signature database, as the firmware checks it."""

    list_type: str
    """The signature list's type, by name (`EfiCertX509`, `EfiCertSha256`...)."""
    owner: str
    """The signature owner GUID (who enrolled it: Microsoft, the distribution...)."""
    subject: str | None
    """An X.509 certificate's subject (RFC 4514), None for a hash."""
    sha256: str
    """SHA-256 of the signature data (the DER certificate, or the hash itself)."""


@dataclass(frozen=True)
class SecureBootVariables:
    """The Secure Boot part of one NVRAM file."""

    keys: Mapping[str, tuple[Signature, ...]]
    """Each key variable present (PK, KEK, db, dbx), parsed."""
    raw: Mapping[str, bytes]
    """Each key variable and switch present, its data exactly as stored."""
    secure_boot_enable: bool | None
    custom_mode: bool | None

    @property
    def secure_boot_enabled(self) -> bool:
        """What the firmware makes of these at boot: Secure Boot on needs a platform key
        (user mode), `SecureBootEnable` set and no custom mode."""
        return (
            "PK" in self.keys and self.secure_boot_enable is True and self.custom_mode is not True
        )

    def subjects(self, name: str) -> list[str]:
        """The certificate subjects enrolled in key variable ``name``."""
        return [sig.subject for sig in self.keys.get(name, ()) if sig.subject is not None]


def read_secure_boot_variables(nvram: Path) -> SecureBootVariables:
    """Parse ``nvram`` (a raw edk2 varstore, as libvirt keeps it) with virt-firmware.

    Raises ``ValueError`` naming the file when it is no edk2 varstore (virt-firmware itself
    would exit the process), and when a variable has a name of ours under another GUID.
    """
    if not Edk2VarStore.probe(str(nvram)):
        raise ValueError(f"{nvram}: no edk2 variable store in it")
    try:
        varlist: Mapping[str, Any] = Edk2VarStore(str(nvram)).get_varlist()
    except SystemExit as error:  # virt-firmware's answer to a damaged volume header
        raise ValueError(f"{nvram}: not a readable edk2 variable store") from error
    keys: dict[str, tuple[Signature, ...]] = {}
    raw: dict[str, bytes] = {}
    for name, guid in {**KEY_DATABASES, **SWITCHES}.items():
        var = varlist.get(name)
        if var is None:
            continue
        if str(var.guid) != guid:
            raise ValueError(f"{nvram}: variable {name} has GUID {var.guid}, not {guid}")
        raw[name] = bytes(var.data)
        if name in KEY_DATABASES:
            keys[name] = _signatures(var.sigdb)
    return SecureBootVariables(
        keys=keys,
        raw=raw,
        secure_boot_enable=_switch(raw.get("SecureBootEnable")),
        custom_mode=_switch(raw.get("CustomMode")),
    )


def _signatures(sigdb: Any) -> tuple[Signature, ...]:
    """The entries of a parsed signature database (virt-firmware's ``EfiSigDB``)."""
    found = []
    for siglist in sigdb:
        certificate: x509.Certificate | None = siglist.x509
        for entry in siglist:
            data = bytes(entry["data"])
            found.append(
                Signature(
                    list_type=str(guids.name(siglist.guid)).removeprefix("guid:"),
                    owner=str(entry["guid"]),
                    subject=certificate.subject.rfc4514_string() if certificate else None,
                    sha256=hashlib.sha256(data).hexdigest(),
                )
            )
    return tuple(found)


def _switch(data: bytes | None) -> bool | None:
    """A one-byte boolean variable; None when absent."""
    if data is None:
        return None
    if len(data) != 1 or data[0] not in (0, 1):
        raise ValueError(f"a Secure Boot switch holds {data.hex()}, not one byte 00 or 01")
    return data[0] == 1
