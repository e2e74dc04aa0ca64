"""The previous release (N-1), extracted from this repository's history, for the tests that
run it beside this one (docs/upgrades.md)."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator

import pytest

from chaos.harness import kill_leftovers
from keeper_shared.messages.releases import OLDEST_RELEASE
from support.released_tree import ReleasedTree, ReleaseMissingError, extract_release


@pytest.fixture(scope="session")
def previous_release(tmp_path_factory: pytest.TempPathFactory) -> ReleasedTree:
    """Release N-1 from its recorded commit. A clone without it (shallow) skips, and fails
    under ``CI=true``: such a clone must not pass by not testing upgrades."""
    try:
        return extract_release(OLDEST_RELEASE, tmp_path_factory.mktemp("previous-release"))
    except ReleaseMissingError as error:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{error} (CI=true: the upgrade tests must not skip)")
        pytest.skip(str(error))


@pytest.fixture(autouse=True)
def no_process_outlives_the_test() -> Iterator[None]:
    """After each test, SIGKILL any service process group the harness did not reap (a test
    cut short by a timeout never reaches its own cleanup)."""
    yield
    left = kill_leftovers()
    if left:
        warnings.warn(f"killed leftover service process groups {left}", stacklevel=1)
