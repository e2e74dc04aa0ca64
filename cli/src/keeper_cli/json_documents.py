"""The JSON documents ``keeper ... --json`` prints, as a versioned schema.

Every object it prints (on stdout, or on stderr for an error) carries ``"schema":
"keeper.<kind>/v<N>"``; a list holds objects that each carry their own. Within one
version fields are only added, never renamed, removed or given another meaning; anything
else raises the version. A field's name is the table column's in lower case with ``_``
for spaces (``VM ID`` is ``vm_id``). ``docs/cli-json.md`` documents each kind and its
fields, and the tests hold every printed document to :data:`FIELDS`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from keeper_shared.messages.adoption import VmAdoptionResult
from keeper_shared.messages.snapshot import SnapshotInfo
from keeper_shared.messages.state import StateHistory

JSON_SCHEMA_VERSION = 2
"""Raised when a document changes other than by a new field. 2: ``vm-restore`` has
``epoch`` and ``versions`` instead of a ``detail`` map of strings, and ``tpm-acceptance``
gives its versions as numbers (they were strings)."""

FIELDS: dict[str, tuple[str, ...]] = {
    "error": ("error", "exit_code", "message"),
    "vm": (
        "vm_id",
        "name",
        "guest_os",
        "host",
        "running",
        "epoch",
        "protection",
        "newest_persisted_at",
        "newest_persisted_age_s",
        "state",
        "lost_from",
        "last_host",
        "tpm_encrypted",
        "tpm_stranded",
        "tpm_reset",
    ),
    "unprotected-vm": (
        "vm_id",
        "name",
        "host",
        "running",
        "protection",
        "reasons",
        "reported_at",
    ),
    "host": (
        "host",
        "status",
        "last_seen",
        "last_seen_age_s",
        "cluster",
        "capabilities",
        "vms",
        "unprotected",
    ),
    "tpm-approval": ("vm_id", "name", "approved", "tpm_xml", "encrypt_state"),
    "vm-start": ("vm_id", "host", "epoch", "started"),
    "vm-stop": ("vm_id", "mode", "stopped", "retrieved", "error"),
    "adoption": tuple(VmAdoptionResult.model_fields),
    "state-history": tuple(StateHistory.model_fields),
    "tpm-acceptance": ("vm_id", "version", "reset_version"),
    "endorsement-key": (
        "vm_id",
        "version",
        "public_key_pem",
        "certificate_pem",
        "public_area_sha256",
    ),
    "vm-restore": ("vm_id", "host", "restored", "epoch", "versions"),
    "snapshot": ("vm_id", "snapshot_id", "versions", "memory"),
    "vm-revert": ("vm_id", "snapshot_id", "host", "epoch", "versions"),
    "snapshot-info": tuple(SnapshotInfo.model_fields),
    "snapshot-deletion": ("vm_id", "snapshot_id", "deleted"),
    "state-deletion": ("vm_id", "tpm_disabled", "deleted"),
    "clone": ("source_vm_id", "target_vm_id", "tpm", "versions"),
    "export": ("vm_id", "file", "bytes"),
    "import": ("vm_id", "file", "imported"),
    "template": (
        "template_id",
        "name",
        "source_vm_id",
        "nvram",
        "guest_os",
        "arch",
        "machine",
        "firmware",
        "secure_boot",
        "encrypt_state",
        "memory_mib",
        "vcpus",
        "created_at",
    ),
    "template-deletion": ("template_id", "name", "deleted", "nvram_versions"),
    "vm-creation": ("vm_id", "name", "template_id", "tpm_xml", "nvram"),
}
"""Each kind's fields (besides ``schema``), in the order they are printed."""


def schema_id(kind: str) -> str:
    """The ``schema`` value of a document of ``kind``, e.g. ``keeper.vm/v2``."""
    return f"keeper.{kind}/v{JSON_SCHEMA_VERSION}"


def document(kind: str, fields: Mapping[str, Any]) -> dict[str, Any]:
    """A document of ``kind``: its schema id first, then ``fields``."""
    if kind not in FIELDS:
        raise KeyError(f"no JSON schema for {kind!r}: add it to FIELDS and docs/cli-json.md")
    return {"schema": schema_id(kind), **fields}
