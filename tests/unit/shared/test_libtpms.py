"""Which TPM state formats each libtpms release loads and which profile it makes, as
libtpms' own sources fix them (see `keeper_shared.libtpms`)."""

from __future__ import annotations

import pytest

from keeper_shared.libtpms import (
    PROFILE_LEVELS,
    LibtpmsRelease,
    LibtpmsVersionError,
    release_of,
)


@pytest.mark.parametrize(
    ("version", "release"),
    [
        ("0.7.3", LibtpmsRelease(highest_level=1, newest_profile=None)),
        ("0.9.2", LibtpmsRelease(highest_level=1, newest_profile=None)),
        ("0.10.0", LibtpmsRelease(highest_level=7, newest_profile="default-v1")),
        ("0.10.2", LibtpmsRelease(highest_level=7, newest_profile="default-v1")),
        ("0.11.1", LibtpmsRelease(highest_level=8, newest_profile="default-v2")),
        ("1.0", LibtpmsRelease(highest_level=8, newest_profile="default-v2")),
    ],
)
def test_each_release_loads_up_to_its_level(version: str, release: LibtpmsRelease) -> None:
    assert release_of(version) == release


def test_the_newest_profile_of_each_release_is_a_level_it_loads() -> None:
    for version in ("0.10.1", "0.11.0"):
        release = release_of(version)
        assert release.newest_profile is not None
        assert PROFILE_LEVELS[release.newest_profile] == release.highest_level


@pytest.mark.parametrize("version", ["", "0", "zero.nine", "0.x.1"])
def test_a_version_that_is_no_version_is_refused(version: str) -> None:
    with pytest.raises(LibtpmsVersionError, match=r"is not major\.minor"):
        release_of(version)
