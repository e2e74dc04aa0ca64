"""Chaos tests start many processes; none may outlive its test, whatever ended it."""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import pytest

from chaos.harness import kill_leftovers


@pytest.fixture(autouse=True)
def no_process_outlives_the_test() -> Iterator[None]:
    """After each test, SIGKILL any service process group the harness did not reap (a test
    cut short by a timeout never reaches its own cleanup)."""
    yield
    left = kill_leftovers()
    if left:
        warnings.warn(f"killed leftover service process groups {left}", stacklevel=1)
