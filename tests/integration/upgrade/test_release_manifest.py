"""The manifest frozen for the previous release is what that release's code declares, read
from its payload classes in a process that imports the released tree."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from keeper_shared.messages.releases import FROZEN_MANIFESTS, current_manifest
from support.released_tree import REPOSITORY, ReleasedTree

DECLARED_MANIFEST = """
import importlib, json, pkgutil
import keeper_shared.messages as package
from keeper_shared.messages.envelope import Payload
for module in pkgutil.iter_modules(package.__path__):
    importlib.import_module(f"keeper_shared.messages.{module.name}")
def classes(base):
    for subclass in base.__subclasses__():
        yield subclass
        yield from classes(subclass)
print(json.dumps({
    c.__dict__["message_type"]: c.schema_version
    for c in classes(Payload)
    if "message_type" in c.__dict__ and c.__module__.startswith("keeper_shared.messages.")
}))
"""
"""Kept apart from ``current_manifest`` on purpose: it must run against code that predates
that function."""


def declared_manifest(shared_sources: str) -> dict[str, int]:
    """What the keeper_shared under ``shared_sources`` declares, read in a fresh process."""
    result = subprocess.run(
        [sys.executable, "-c", DECLARED_MANIFEST],
        env={**os.environ, "PYTHONPATH": shared_sources},
        capture_output=True,
        check=True,
        text=True,
    )
    declared: dict[str, int] = json.loads(result.stdout)
    return declared


def test_the_frozen_manifest_is_what_the_released_code_declares(
    previous_release: ReleasedTree,
) -> None:
    declared = declared_manifest(str(previous_release.root / "shared" / "src"))
    assert declared == dict(FROZEN_MANIFESTS[previous_release.release])


def test_the_same_reading_of_this_tree_gives_the_current_manifest() -> None:
    assert declared_manifest(str(REPOSITORY / "shared" / "src")) == dict(current_manifest())
