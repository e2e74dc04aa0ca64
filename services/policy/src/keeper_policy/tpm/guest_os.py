"""Guest-OS TPM rules in the spirit of oVirt's osinfo: per OS family, from a minimum
version up, a TPM is `unsupported`, `supported` or `required`. Pure: no I/O.

An OS no rule names (a family without rules, or a version below every rule) is
`unsupported`: TPMs are off by default.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field, field_validator

from keeper_policy.versions import Version, VersionError, parse_version
from keeper_shared.messages.tpm import OsTpmSupport

_GUEST_OS_RE = re.compile(r"^(?P<family>[a-z][a-z0-9]*(?:-[a-z][a-z0-9]*)*)-(?P<version>\d\S*)$")


class GuestOsRule(BaseModel):
    """From ``min_version`` of ``family`` up (until a rule with a higher minimum), TPM
    support is ``support``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    family: str = Field(pattern=r"^[a-z][a-z0-9-]*$", description="OS family, e.g. `windows`.")
    min_version: str = Field(description="Lowest version the rule covers, e.g. `8.1`.")
    support: OsTpmSupport = Field(description="TPM support from that version up.")

    @field_validator("min_version")
    @classmethod
    def _is_version(cls, value: str) -> str:
        parse_version(value)
        return value


DEFAULT_GUEST_OS_RULES: tuple[GuestOsRule, ...] = (
    GuestOsRule(family="windows", min_version="8", support=OsTpmSupport.SUPPORTED),
    GuestOsRule(family="windows", min_version="11", support=OsTpmSupport.REQUIRED),
    GuestOsRule(family="windows-server", min_version="2012", support=OsTpmSupport.SUPPORTED),
    GuestOsRule(family="rhel", min_version="7", support=OsTpmSupport.SUPPORTED),
    GuestOsRule(family="rhcos", min_version="4", support=OsTpmSupport.SUPPORTED),
    GuestOsRule(family="linux", min_version="4", support=OsTpmSupport.SUPPORTED),
)
"""oVirt's sample configuration (ovirt-engine ``packaging/conf/osinfo-defaults.properties``,
``os.<id>.devices.tpm.value``, inherited through ``derivedFrom``): Windows from 8 may have
a TPM and Windows 11 needs one; Windows Server from 2012 may have one (2012 R2 to 2025
inherit it: none of them needs one to install); RHEL from 7 on every architecture, Red Hat
CoreOS (``rhcos_x64``) and "Other Linux (kernel 4.x)" (``other_linux_kernel_4``, kernel 4
and later here) may have one. Every other OS is off until configured."""

DEFAULT_GUEST_OS_ALIASES: dict[str, str] = {
    "win8": "windows-8",
    "win8.1": "windows-8.1",
    "win10": "windows-10",
    "win11": "windows-11",
    "win2k12": "windows-server-2012",
    "win2k12r2": "windows-server-2012r2",
    "win2k16": "windows-server-2016",
    "win2k19": "windows-server-2019",
    "win2k22": "windows-server-2022",
    "win2k25": "windows-server-2025",
    # Server releases named by year under the desktop family, as people often write them.
    "windows-2012": "windows-server-2012",
    "windows-2012r2": "windows-server-2012r2",
    "windows-2016": "windows-server-2016",
    "windows-2019": "windows-server-2019",
    "windows-2022": "windows-server-2022",
    "windows-2025": "windows-server-2025",
    # oVirt's os ids (osinfo-defaults.properties), so a VM coming from oVirt keeps its id.
    "windows_8": "windows-8",
    "windows_8x64": "windows-8",
    "windows_10": "windows-10",
    "windows_10x64": "windows-10",
    "windows_11": "windows-11",
    "windows_2012x64": "windows-server-2012",
    "windows_2012r2x64": "windows-server-2012r2",
    "windows_2016x64": "windows-server-2016",
    "windows_2019x64": "windows-server-2019",
    "windows_2022": "windows-server-2022",
    "windows_2025": "windows-server-2025",
    "rhel_7x64": "rhel-7",
    "rhel_8x64": "rhel-8",
    "rhel_9x64": "rhel-9",
    "rhel_10x64": "rhel-10",
    "rhel_7_ppc64": "rhel-7",
    "rhel_8_ppc64": "rhel-8",
    "rhel_9_ppc64": "rhel-9",
    "rhel_7_s390x": "rhel-7",
    "rhcos_x64": "rhcos-4",
    "other_linux_kernel_4": "linux-4",
}
"""osinfo short ids, oVirt os ids and common spellings, mapped to `<family>-<version>`
(keys lower-case: ids are matched case-insensitively)."""


@dataclass(frozen=True)
class GuestOsVerdict:
    """What the rules say of one guest OS, and why."""

    support: OsTpmSupport
    explanation: str


def split_guest_os(guest_os: str, aliases: Mapping[str, str]) -> tuple[str, Version] | None:
    """`windows-server-2022` -> (`windows-server`, 2022); None when it is not of that form."""
    canonical = aliases.get(guest_os.lower(), guest_os.lower())
    match = _GUEST_OS_RE.match(canonical)
    if match is None:
        return None
    try:
        return match.group("family"), parse_version(match.group("version"))
    except VersionError:
        return None


def guest_os_support(
    guest_os: str, rules: Sequence[GuestOsRule], aliases: Mapping[str, str]
) -> GuestOsVerdict:
    """The rule with the highest minimum at or below the OS's version decides."""
    parsed = split_guest_os(guest_os, aliases)
    if parsed is None:
        return GuestOsVerdict(
            OsTpmSupport.UNSUPPORTED,
            f"guest OS {guest_os!r} is not a `<family>-<version>` id policy knows",
        )
    family, version = parsed
    family_rules = [rule for rule in rules if rule.family == family]
    if not family_rules:
        return GuestOsVerdict(
            OsTpmSupport.UNSUPPORTED, f"no rule allows a TPM for the {family} family"
        )
    applicable = [rule for rule in family_rules if parse_version(rule.min_version) <= version]
    if not applicable:
        lowest = min(family_rules, key=lambda rule: parse_version(rule.min_version))
        return GuestOsVerdict(
            OsTpmSupport.UNSUPPORTED,
            f"{family} {version} is below {lowest.min_version}, the first version with a TPM rule",
        )
    rule = max(applicable, key=lambda rule: parse_version(rule.min_version))
    return GuestOsVerdict(
        rule.support,
        f"{family} {version}: {rule.support.value} (rule {family} >= {rule.min_version})",
    )
