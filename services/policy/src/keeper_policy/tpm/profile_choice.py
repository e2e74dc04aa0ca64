"""Which libtpms profile a new TPM is made with in a cluster. Pure: no I/O.

A TPM's profile is fixed when swtpm first starts it, and with it the StateFormatLevel every
later host must load (see `keeper_shared.libtpms`). libtpms' advice is to make TPMs with the
profile of the oldest libtpms in the fleet; otherwise a TPM first started on a new host can
never move back to an old one. libvirt pins it with `<profile name='...'/>` in the TPM's
`<backend>` (libvirt 10.10 and later; swtpm must support ``--profile``, libtpms 0.10 and
later). So:

- ``oldest-host`` (the default): where every live host of the cluster can pin a profile,
  the newest profile of the oldest libtpms among them; where one cannot, no element (each
  libtpms then makes its own default, and placement refuses to move a TPM to a host that
  cannot load it);
- a profile name: pinned for every new TPM of the cluster, refused when a live host cannot
  pin it or cannot load its level.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final
from xml.sax.saxutils import quoteattr

from keeper_policy.versions import VersionError, parse_version
from keeper_shared.libtpms import PROFILE_LEVELS, LibtpmsVersionError, release_of
from keeper_shared.messages.host import HostCapabilities

OLDEST_HOST: Final = "oldest-host"

PROFILE_ELEMENT_LIBVIRT: Final = "10.10.0"
"""The first libvirt that knows `<profile>` in a TPM backend."""


@dataclass(frozen=True)
class ProfileChoice:
    """The profile to pin (None: no element), or why the configured one cannot be."""

    profile: str | None = None
    problem: str | None = None


def choose_profile(
    cluster: str, hosts: Mapping[str, HostCapabilities], setting: str
) -> ProfileChoice:
    """The profile new TPMs of ``cluster`` get under ``setting`` (see the module)."""
    newest = {host: _newest_profile(caps) for host, caps in hosts.items()}
    if setting == OLDEST_HOST:
        pinnable = [profile for profile in newest.values() if profile is not None]
        if not hosts or len(pinnable) < len(newest):
            return ProfileChoice()
        return ProfileChoice(min(pinnable, key=PROFILE_LEVELS.__getitem__))
    level = PROFILE_LEVELS.get(setting)
    if level is None:
        return ProfileChoice(problem=f"cluster {cluster}'s TPM profile {setting!r} is unknown")
    unable = sorted(
        host
        for host, profile in newest.items()
        if profile is None or PROFILE_LEVELS[profile] < level
    )
    if unable:
        return ProfileChoice(
            problem=f"hosts of cluster {cluster} that cannot make TPMs with its profile "
            f"{setting} (libvirt {PROFILE_ELEMENT_LIBVIRT} and a libtpms that implements "
            f"StateFormatLevel {level} are needed): {', '.join(unable)}"
        )
    return ProfileChoice(setting)


def backend_profile_element(profile: str | None) -> str:
    """The `<profile>` child of the TPM backend for ``profile`` ('' for none)."""
    return "" if profile is None else f"<profile name={quoteattr(profile)}/>"


def _newest_profile(caps: HostCapabilities) -> str | None:
    """The newest profile this host can pin, or None: its libvirt or libtpms predates
    profiles, or it did not say which it runs."""
    if caps.libtpms_version is None:
        return None
    try:
        if parse_version(caps.libvirt_version) < parse_version(PROFILE_ELEMENT_LIBVIRT):
            return None
        return release_of(caps.libtpms_version).newest_profile
    except (VersionError, LibtpmsVersionError):
        return None
