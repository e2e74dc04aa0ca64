"""The official AsyncAPI parser accepts docs/asyncapi.json: no error, only the findings
docs/integrating.md lists and explains, and every message named for generated code."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from keeper_devtools.contract import build_document, discover_payloads, message_id
from support.asyncapi_parser import REPO, validate

COMMITTED = REPO / "docs" / "asyncapi.json"

EXPECTED_FINDINGS: dict[str, set[str]] = {
    "error": set(),
    "warning": set(),
    # The document is AsyncAPI 3.0.0, the 3.x version the tools have supported longest;
    # 3.1.0 adds only ROS 2 bindings and small schema changes this bus does not use.
    "info": {"asyncapi-latest-version"},
    "hint": set(),
}
"""What the parser may say of the document; docs/integrating.md lists the same, with why."""


def _broken_copy(path: Path) -> Path:
    """The document with two mistakes the parser must catch: a field AsyncAPI 3.0 removed
    (``messageId``: the message's key is its id now) and an operation on no channel."""
    document = build_document()
    first = next(iter(document["components"]["messages"].values()))
    first["messageId"] = "anonymous-no-more"
    first_operation = next(iter(document["operations"].values()))
    first_operation["channel"] = {"$ref": "#/channels/no-such-channel"}
    path.write_text(json.dumps(document), encoding="utf-8")
    return path


@pytest.mark.node
def test_the_official_parser_accepts_the_document_and_catches_a_broken_one(
    asyncapi_validator: Path, tmp_path: Path
) -> None:
    committed, broken = validate(asyncapi_validator, COMMITTED, _broken_copy(tmp_path / "b.json"))

    assert committed.parsed, committed.findings("error")
    for severity, expected in EXPECTED_FINDINGS.items():
        assert committed.codes(severity) == expected, (
            f"the parser {committed.parser_version} now says ({severity}): "
            f"{committed.findings(severity)}; fix the generator, or list and explain the "
            "finding in docs/integrating.md and EXPECTED_FINDINGS"
        )
    # What generated clients are built from: every message under its class name.
    assert committed.message_ids == {
        cls.message_type: message_id(cls) for cls in discover_payloads()
    }

    # The harness is not blind: the same parser refuses a document with errors.
    assert not broken.parsed
    assert {"asyncapi-document-resolved", "invalid-ref"} <= broken.codes("error")
