"""libtpms, the TPM emulation swtpm runs: its version on this host, and which TPM state
formats and profiles each version reads and makes.

Whether a host can load a VM's TPM state is libtpms' decision, not swtpm's: every state
carries a StateFormatLevel, fixed when the TPM was first started, and a libtpms refuses a
state whose level is above the highest it implements. Since libtpms 0.10 the level follows
from the TPM's profile, also fixed at first start and carried in the state:

- libtpms 0.9 and older have no profiles; their states carry none and are read by every
  later libtpms as the ``null`` profile, level 1 (which "NEVER" changes);
- libtpms 0.10 reads levels up to 7; its newest profile is ``default-v1`` (level 7);
- libtpms 0.11 reads levels up to 8; its newest profile is ``default-v2`` (level 8).

(Read from libtpms' ``src/tpm2/RuntimeProfile.c``: ``STATE_FORMAT_LEVEL_CURRENT`` and the
profile table, at the tags v0.9.x, v0.10.x and master.) A libtpms newer than this table is
taken to read at least what the newest known one reads, as libtpms always reads older
levels.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from dataclasses import dataclass
from typing import Final

NULL_PROFILE: Final = "null"
"""The profile of every state libtpms 0.9 and older wrote (they knew no profiles)."""

NULL_PROFILE_LEVEL: Final = 1


@dataclass(frozen=True)
class LibtpmsRelease:
    """What one libtpms minor release reads and makes."""

    highest_level: int
    """The highest StateFormatLevel it loads."""
    newest_profile: str | None
    """The profile it gives a new TPM by default; None before profiles existed."""


_RELEASES: Final = {
    (0, 9): LibtpmsRelease(highest_level=NULL_PROFILE_LEVEL, newest_profile=None),
    (0, 10): LibtpmsRelease(highest_level=7, newest_profile="default-v1"),
    (0, 11): LibtpmsRelease(highest_level=8, newest_profile="default-v2"),
}


@dataclass(frozen=True)
class StateProfile:
    """A TPM state's libtpms profile and the StateFormatLevel it needs to load."""

    name: str
    state_format_level: int


NULL_STATE_PROFILE: Final = StateProfile(NULL_PROFILE, NULL_PROFILE_LEVEL)
"""The profile of every state libtpms 0.9 and older wrote."""

PROFILE_LEVELS: Final = {NULL_PROFILE: NULL_PROFILE_LEVEL, "default-v1": 7, "default-v2": 8}
"""The StateFormatLevel of each built-in profile (``custom`` varies with its contents)."""


class LibtpmsVersionError(ValueError):
    """A libtpms version that is not ``major.minor[.micro]``."""


def release_of(version: str) -> LibtpmsRelease:
    """What libtpms ``version`` (e.g. ``"0.9.2"``) reads and makes."""
    try:
        major, minor = (int(part) for part in version.split(".")[:2])
    except ValueError:
        raise LibtpmsVersionError(f"libtpms {version!r} is not major.minor[.micro]") from None
    known = sorted(_RELEASES)  # contiguous minor releases: clamping finds each one
    return _RELEASES[min(max((major, minor), known[0]), known[-1])]


def installed_libtpms_version() -> str | None:
    """This host's libtpms version (``TPMLIB_GetVersion`` of the library swtpm links), or
    None when libtpms is not installed."""
    name = ctypes.util.find_library("tpms") or "libtpms.so.0"
    try:
        library = ctypes.CDLL(name)
    except OSError:
        return None
    get_version = library.TPMLIB_GetVersion
    get_version.restype = ctypes.c_uint32
    get_version.argtypes = []
    packed = int(get_version())
    # TPMLIB_GetVersion packs major, minor and micro as 0x00MMmmuu.
    return f"{(packed >> 16) & 0xFF}.{(packed >> 8) & 0xFF}.{packed & 0xFF}"
