"""Checks of what a user typed, made before any network call: each failure is one line
that names the field and the rule, and ends the command with exit 2.

The checks are typer callbacks (``typer.Argument(callback=vm_reference)``) or plain
functions a command calls first thing; both raise click's ``BadParameter`` or
``UsageError`` (typer's own click, see :mod:`keeper_cli.typer_click`), which
:mod:`keeper_cli.command_group` prints as one line. New commands should take their
arguments through these, so every command refuses bad input the same way.
"""

from __future__ import annotations

import math
import os
import re
import stat
import uuid
from collections.abc import Mapping
from pathlib import Path

import typer
from pydantic import ValidationError

from keeper_cli.typer_click import UsageError
from keeper_shared.domain_document import (
    MAX_DOMAIN_XML_CHARS,
    DomainDocumentError,
    read_domain_element,
)
from keeper_shared.messages.deletion import REASON_MAX_LENGTH
from keeper_shared.messages.snapshot import SNAPSHOT_ID_PATTERN
from keeper_shared.messages.transfer import MAX_PASSPHRASE_CHARS, MIN_PASSPHRASE_CHARS
from keeper_shared.messages.types import HOST_ID_PATTERN, VM_NAME_PATTERN

MAX_TIMEOUT_S = 24 * 3600.0
"""A longer wait is a typo: no request takes a day."""

MAX_BUNDLE_BYTES = 64 * 1024 * 1024
"""A bundle holds one VM's TPM and NVRAM: a few MB at most. A bigger file is not one."""


def usage(message: str) -> UsageError:
    """A usage error about several options at once (no single field to name)."""
    return UsageError(message)


def vm_reference(value: str) -> str:
    """A VM id (UUID) or a libvirt domain name."""
    if re.fullmatch(VM_NAME_PATTERN, value):
        return value
    raise typer.BadParameter(
        f"{value!r} is neither a VM id (UUID) nor a domain name (a letter or digit, then up "
        "to 63 letters, digits, '_', '.', '-')"
    )


def optional_vm_reference(value: str | None) -> str | None:
    """:func:`vm_reference`, for an argument that may be left out."""
    return None if value is None else vm_reference(value)


def vm_references(values: list[str]) -> list[str]:
    """Several VM ids or names, each checked as :func:`vm_reference`."""
    return [vm_reference(value) for value in values]


def domain_name(value: str) -> str:
    """A libvirt domain name for a new VM (the names vTPM Keeper can register)."""
    if re.fullmatch(VM_NAME_PATTERN, value):
        return value
    raise typer.BadParameter(
        f"{value!r} is not a domain name vTPM Keeper accepts (a letter or digit, then up to 63 "
        "letters, digits, '_', '.', '-')"
    )


def vm_id(value: str | None) -> str | None:
    """A VM's UUID, in canonical form (None stays None: the option was not given)."""
    if value is None:
        return None
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise typer.BadParameter(f"{value!r} is not a UUID") from None


def host_id(value: str | None) -> str | None:
    """A host id as hosts announce themselves (None stays None)."""
    if value is None or re.fullmatch(HOST_ID_PATTERN, value):
        return value
    raise typer.BadParameter(
        f"{value!r} is not a host id (lower-case letters, digits and '-', at most 63; see "
        "`keeper hosts`)"
    )


def snapshot_id(value: str | None) -> str | None:
    """A snapshot name (None stays None)."""
    if value is None or re.fullmatch(SNAPSHOT_ID_PATTERN, value):
        return value
    raise typer.BadParameter(
        f"{value!r} is not a snapshot name (a letter or digit, then up to 63 letters, digits, "
        "'_', '.', '-'; no spaces)"
    )


def reason(value: str) -> str:
    """A reason for the audit log."""
    if len(value) > REASON_MAX_LENGTH:
        raise typer.BadParameter(f"at most {REASON_MAX_LENGTH} characters, not {len(value)}")
    return value


def timeout_s(value: float | None) -> float | None:
    """Seconds to wait for an answer (None: the configured default)."""
    if value is None:
        return None
    if not math.isfinite(value) or not 0 < value <= MAX_TIMEOUT_S:
        raise typer.BadParameter(f"{value} is not a time-out: give seconds, above 0, at most a day")
    return value


def readable_file(path: Path, what: str) -> Path:
    """A regular file this user can read."""
    try:
        info = path.stat()
    except FileNotFoundError:
        raise UsageError(f"{what} {path}: no such file") from None
    except OSError as error:
        raise UsageError(f"{what} {path}: {error.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        raise UsageError(f"{what} {path}: not a regular file")
    if not os.access(path, os.R_OK):
        raise UsageError(f"{what} {path}: not readable by this user")
    return path


def domain_xml_file(path: Path | None) -> Path | None:
    """A file holding a libvirt domain XML policy would take: readable, within the size
    bound, well-formed, no DOCTYPE or entities, a ``<domain>`` (checked again by policy)."""
    if path is not None:
        domain_xml_text(path)
    return path


def domain_xml_text(path: Path) -> str:
    """The domain XML in ``path``, checked as :func:`domain_xml_file` says."""
    try:
        with path.open(encoding="utf-8") as file:
            text = file.read(MAX_DOMAIN_XML_CHARS + 1)
        read_domain_element(text)
    except OSError as error:
        raise typer.BadParameter(f"cannot read {path}: {error.strerror}") from None
    except (UnicodeDecodeError, DomainDocumentError) as error:
        raise typer.BadParameter(f"{path}: {error}") from None
    return text


def bundle_bytes(path: Path) -> bytes:
    """A bundle file's bytes (a bundle is small; a huge file is refused unread)."""
    readable_file(path, "bundle file")
    if path.stat().st_size > MAX_BUNDLE_BYTES:
        raise UsageError(
            f"bundle file {path}: {path.stat().st_size} bytes, more than any bundle "
            f"({MAX_BUNDLE_BYTES} at most)"
        )
    try:
        return path.read_bytes()
    except OSError as error:
        raise UsageError(f"bundle file {path}: {error.strerror}") from None


def output_file(path: Path, *, overwrite: bool) -> Path:
    """A file the command may create (or replace, with ``overwrite``): its directory
    exists and is writable, and nothing but a regular file is in the way."""
    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        raise UsageError(f"--output {path}: directory {directory} does not exist")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise UsageError(f"--output {path}: directory {directory} is not writable")
    if path.exists() or path.is_symlink():
        if not path.is_file():
            raise UsageError(f"--output {path}: exists and is not a regular file")
        if not overwrite:
            raise UsageError(f"--output {path}: exists (--force overwrites it)")
    return path


def passphrase(text: str, where: str) -> str:
    """A bundle passphrase as the store accepts it. ``where`` names its source in the
    message; the passphrase itself never appears in one."""
    if len(text) < MIN_PASSPHRASE_CHARS:
        raise UsageError(
            f"{where}: the passphrase has {len(text)} characters, at least "
            f"{MIN_PASSPHRASE_CHARS} are needed"
        )
    if len(text) > MAX_PASSPHRASE_CHARS:
        raise UsageError(
            f"{where}: the passphrase is longer than {MAX_PASSPHRASE_CHARS} characters"
        )
    return text


def passphrase_from_file(path: Path) -> str:
    """The passphrase in a file: its first line, without the line end."""
    where = f"--passphrase-file {path}"
    readable_file(path, "--passphrase-file")
    if path.stat().st_size > 4 * MAX_PASSPHRASE_CHARS:
        raise UsageError(f"{where}: too big to hold a passphrase")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"{where}: not UTF-8 text") from None
    except OSError as error:
        raise UsageError(f"{where}: {error.strerror}") from None
    if not text.strip():
        raise UsageError(f"{where}: the file is empty")
    return passphrase(text.splitlines()[0], where)


def model_error(error: ValidationError, options: Mapping[str, str]) -> UsageError:
    """The first failure of a request model built from options, naming the option
    (``options`` maps field names to option names) and pydantic's rule, never the value
    (which may be a secret)."""
    first = error.errors(include_input=False, include_url=False)[0]
    location = [str(part) for part in first["loc"]]
    name = options.get(location[0], ".".join(location)) if location else "input"
    rule = str(first["msg"]).removeprefix("Value error, ")
    return UsageError(f"{name}: {rule}")
