"""A tagged release's source tree, extracted from this repository's history with
``git archive``, to run it beside the current one (tests/integration/upgrade)."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[2]
SERVICE_SOURCES = (
    "shared/src",
    "services/host-agent/src",
    "services/policy/src",
    "services/state-store/src",
)


class ReleaseTagMissingError(LookupError):
    """The release's tag is not in this clone."""


@dataclass(frozen=True)
class ReleasedTree:
    """A release's source tree on disk."""

    release: str
    root: Path

    @property
    def pythonpath(self) -> str:
        """``PYTHONPATH`` that makes the same venv run this release's services: its source
        directories come before the editable installs of the current tree."""
        return os.pathsep.join(str(self.root / source) for source in SERVICE_SOURCES)


def extract_release(release: str, into: Path) -> ReleasedTree:
    """Extract tag ``v<release>`` into ``into``; raise ReleaseTagMissingError without it."""
    tag = f"v{release}"
    found = subprocess.run(
        ["git", "-C", str(REPOSITORY), "rev-parse", "--verify", "--quiet", f"{tag}^{{commit}}"],
        capture_output=True,
        check=False,
    )
    if found.returncode != 0:
        raise ReleaseTagMissingError(
            f"tag {tag} (release {release}) is not in {REPOSITORY}: fetch the tags "
            "(`git fetch --tags`, or clone without --depth) to test rolling upgrades"
        )
    archive = subprocess.run(
        ["git", "-C", str(REPOSITORY), "archive", "--format=tar", tag],
        capture_output=True,
        check=True,
    ).stdout
    # tar(1), not tarfile: Debian 12's Python 3.11.2 has no extraction filters, and an
    # archive git made of this repository's own history needs none.
    into.mkdir(parents=True, exist_ok=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return ReleasedTree(release, into)
