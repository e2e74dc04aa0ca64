"""A released source tree, extracted from this repository's history with ``git archive``,
to run it beside the current one (tests/integration/upgrade)."""

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

# Each release's commit, recorded when it is tagged (docs/upgrades.md). The tests find a
# release by its commit, not its tag: a clone made by fetching the branch alone (as CI's is)
# has the whole history but no tags.
RELEASE_COMMITS = {
    "0.1.0": "b22ef2064d8114d550864130615d1cac95320d22",
}


class ReleaseMissingError(LookupError):
    """The release's commit is not in this clone (a shallow clone)."""


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
    """Extract ``release``'s recorded commit into ``into``; raise ReleaseMissingError when the
    clone lacks it, and ValueError when the release's tag names another commit."""
    commit = RELEASE_COMMITS[release]
    if _resolve(f"{commit}^{{commit}}") != commit:
        raise ReleaseMissingError(
            f"commit {commit[:12]} (release {release}) is not in {REPOSITORY}: clone with the "
            "whole history (without --depth, or `git fetch --unshallow`) to test rolling upgrades"
        )
    tagged = _resolve(f"v{release}^{{commit}}")
    if tagged is not None and tagged != commit:
        raise ValueError(f"tag v{release} names {tagged[:12]}, but release {release} is {commit}")
    archive = subprocess.run(
        ["git", "-C", str(REPOSITORY), "archive", "--format=tar", commit],
        capture_output=True,
        check=True,
    ).stdout
    # tar(1), not tarfile: Debian 12's Python 3.11.2 has no extraction filters, and an
    # archive git made of this repository's own history needs none.
    into.mkdir(parents=True, exist_ok=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return ReleasedTree(release, into)


def _resolve(revision: str) -> str | None:
    """The commit ``revision`` names in this repository, or None when it names nothing here."""
    found = subprocess.run(
        ["git", "-C", str(REPOSITORY), "rev-parse", "--verify", "--quiet", revision],
        capture_output=True,
        text=True,
        check=False,
    )
    return found.stdout.strip() if found.returncode == 0 else None
