"""Fixtures for the integration tests that run swtpm themselves."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from keeper_shared.swtpm_tools import missing_tools, write_private_ca_config
from process_table import swtpm_children


@pytest.fixture(scope="session")
def swtpm_tools() -> None:
    """Skip without swtpm and tpm2-tools, except on CI where that is a broken setup."""
    missing = missing_tools()
    if shutil.which("tpm2_readpublic") is None:
        missing.append("tpm2_readpublic")
    if not missing:
        return
    message = f"missing {', '.join(missing)} (apt-get install swtpm swtpm-tools tpm2-tools)"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture
def no_swtpm_left() -> Iterator[None]:
    """The test must leave no swtpm behind, whether it passed or failed."""
    assert swtpm_children() == [], "an swtpm was running before the test"
    yield
    leftovers = swtpm_children()
    for pid in leftovers:
        # Report the leak, but do not let it outlive the test run.
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert leftovers == [], f"swtpm left running: {leftovers}"


@pytest.fixture(scope="session")
def ca_config(tmp_path_factory: pytest.TempPathFactory, swtpm_tools: None) -> Path:
    """A private swtpm_setup config, so tests do not touch /var/lib/swtpm-localca."""
    return write_private_ca_config(tmp_path_factory.mktemp("swtpm-ca"))
