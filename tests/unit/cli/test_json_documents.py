"""The `--json` schema: every kind is documented with every field, and the documents the
views build have exactly the documented fields."""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime
from pathlib import Path

from keeper_cli.json_documents import FIELDS, JSON_SCHEMA_VERSION, document, schema_id
from keeper_shared.keeper_client import views
from keeper_shared.messages.adoption import UnprotectedVmView

DOC = Path(__file__).parents[3] / "docs" / "cli-json.md"


def _documented() -> dict[str, str]:
    """Each kind's row of the table in docs/cli-json.md."""
    rows = {}
    for line in DOC.read_text(encoding="utf-8").splitlines():
        match = re.match(r"^\| `([a-z-]+)` \|", line)
        if match:
            rows[match.group(1)] = line
    return rows


def test_every_kind_and_field_is_documented() -> None:
    rows = _documented()
    assert set(rows) == set(FIELDS)
    for kind, fields in FIELDS.items():
        for field in fields:
            assert f"`{field}`" in rows[kind], (kind, field)


def test_documents_carry_their_versioned_schema() -> None:
    assert schema_id("vm") == f"keeper.vm/v{JSON_SCHEMA_VERSION}"
    made = document("vm-start", {"vm_id": "x", "host": "h", "epoch": 1, "started": True})
    assert list(made) == ["schema", *FIELDS["vm-start"]]


def test_view_documents_have_the_documented_fields() -> None:
    now = time.time()
    status = views.VmStatus(
        vm_id="7d4e5a40-3c43-4a8f-9c40-1b3a2b3c4d5e",
        name="vm1",
        guest_os="windows-11",
        host=None,
        epoch=0,
        kinds={"tpm": views.KindStatus(version=None, stored_at=None, size=None)},
    )
    assert tuple(status.as_json(now)) == FIELDS["vm"]
    domain = UnprotectedVmView(
        vm_id="7d4e5a40-3c43-4a8f-9c40-1b3a2b3c4d5e",
        name="vm1",
        host="host-a",
        running=True,
        reasons=["no TPM"],
        reported_at=datetime.now(UTC),
    )
    assert tuple(views.unprotected_json(domain)) == FIELDS["unprotected-vm"]
    host = views.HostStatus(host="host-a", status="alive", last_seen=now, cluster="default")
    assert set(host.as_json(now)) | {"unprotected"} == set(FIELDS["host"])
