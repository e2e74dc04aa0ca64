"""The official AsyncAPI parser (``@asyncapi/parser``, Node.js) and what it says of a document.

The validator is ``devtools/asyncapi-validate/`` (``validate.mjs``, its ``package.json`` and
the ``package-lock.json`` that pins the parser and everything under it). ``npm ci`` installs
it once per lockfile into ``build/asyncapi-validate/<lock hash>/`` (ignored by git), so later
runs only start Node; a changed lockfile gets a fresh directory.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from keeper_devtools.localstack import NotInstalledError
from keeper_devtools.localstack.errors import INSTALL_HINT

REPO = Path(__file__).resolve().parents[2]
VALIDATOR_SOURCE = REPO / "devtools" / "asyncapi-validate"
CACHE_ROOT = REPO / "build" / "asyncapi-validate"
MINIMUM_NODE = (18, 18)
"""What the parser's dependencies (Spectral) declare: ``^18.18 || >= 20.17``."""
_NPM_CI_TIMEOUT_S = 600.0
_VALIDATE_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class Diagnostic:
    """One finding of the parser."""

    severity: str
    """``error``, ``warning``, ``info`` or ``hint``."""
    code: str
    message: str
    path: str


@dataclass(frozen=True)
class ParserReport:
    """What the parser said of one document."""

    source: str
    parser_version: str
    parsed: bool
    """False when the parser refused the document."""
    diagnostics: tuple[Diagnostic, ...]
    message_ids: dict[str, str | None]
    """Wire type (``name``) -> id generated code would use (None: anonymous)."""

    def codes(self, severity: str) -> set[str]:
        """The rule codes of the findings of ``severity``."""
        return {found.code for found in self.diagnostics if found.severity == severity}

    def findings(self, severity: str) -> list[str]:
        """The findings of ``severity`` as ``code at path: message`` lines."""
        return [
            f"{found.code} at {found.path}: {found.message}"
            for found in self.diagnostics
            if found.severity == severity
        ]


def _program(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise NotInstalledError(f"{name} is not installed; {INSTALL_HINT}")
    return found


def check_installed() -> None:
    """Raise NotInstalledError unless node (recent enough for the parser) and npm are."""
    node = _program("node")
    _program("npm")
    version = subprocess.run(
        [node, "--version"], capture_output=True, text=True, check=True, timeout=60
    ).stdout.strip()
    match = re.fullmatch(r"v(\d+)\.(\d+)\.\d+", version)
    if match is None or (int(match[1]), int(match[2])) < MINIMUM_NODE:
        minimum = ".".join(map(str, MINIMUM_NODE))
        raise NotInstalledError(f"node {version} is older than {minimum}; {INSTALL_HINT}")


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path``: two test runs must not install at once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def installed_validator() -> Path:
    """The directory to run ``validate.mjs`` in, with the pinned parser installed (network
    only on the first run for this lockfile)."""
    check_installed()
    lock = (VALIDATOR_SOURCE / "package-lock.json").read_bytes()
    target = CACHE_ROOT / hashlib.sha256(lock).hexdigest()[:16]
    with _locked(CACHE_ROOT / ".install.lock"):
        if not (target / "node_modules" / ".package-lock.json").exists():
            shutil.rmtree(target, ignore_errors=True)
            target.mkdir(parents=True)
            for name in ("package.json", "package-lock.json"):
                shutil.copy2(VALIDATOR_SOURCE / name, target / name)
            installing = subprocess.run(
                # No install scripts: the parser is plain JavaScript.
                [_program("npm"), "ci", "--ignore-scripts", "--no-audit", "--no-fund"],
                cwd=target,
                capture_output=True,
                text=True,
                timeout=_NPM_CI_TIMEOUT_S,
                check=False,
            )
            if installing.returncode != 0:
                shutil.rmtree(target, ignore_errors=True)
                raise RuntimeError(
                    f"npm ci of {VALIDATOR_SOURCE} failed (it needs the npm registry):\n"
                    + installing.stderr[-4000:]
                )
        # Copied on every run, so an edited validator is the one that runs.
        shutil.copy2(VALIDATOR_SOURCE / "validate.mjs", target / "validate.mjs")
    return target


def validate(validator: Path, *documents: Path) -> list[ParserReport]:
    """Run the official parser over ``documents``: one report each, in order."""
    ran = subprocess.run(
        [_program("node"), "validate.mjs", *map(str, documents)],
        cwd=validator,
        capture_output=True,
        text=True,
        timeout=_VALIDATE_TIMEOUT_S,
        check=False,
    )
    if ran.returncode != 0:
        raise RuntimeError(f"validate.mjs exited {ran.returncode}:\n{ran.stderr[-4000:]}")
    reports = []
    for line in ran.stdout.splitlines():
        raw = json.loads(line)
        reports.append(
            ParserReport(
                source=raw["source"],
                parser_version=raw["parser"],
                parsed=raw["parsed"],
                diagnostics=tuple(Diagnostic(**found) for found in raw["diagnostics"]),
                message_ids={message["name"]: message["id"] for message in raw["messages"]},
            )
        )
    if len(reports) != len(documents):
        raise RuntimeError(f"validate.mjs reported {len(reports)} of {len(documents)} documents")
    return reports
