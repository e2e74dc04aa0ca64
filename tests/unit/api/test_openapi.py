"""The committed OpenAPI document is the one the API's routes and models generate."""

from __future__ import annotations

import json
from pathlib import Path

from keeper_api.openapi import default_output, main, render

ROOT = Path(__file__).resolve().parents[3]


def test_committed_document_matches_the_models() -> None:
    committed = (ROOT / "docs" / "openapi.json").read_text(encoding="utf-8")
    assert default_output() == ROOT / "docs" / "openapi.json"
    assert committed == render(), (
        "docs/openapi.json is out of date: run `python -m keeper_api.openapi`"
    )


def test_check_mode_reports_a_stale_file(tmp_path: Path) -> None:
    stale = tmp_path / "openapi.json"
    stale.write_text("{}\n", encoding="utf-8")
    assert main(["--check", "--output", str(stale)]) == 1
    assert main(["--output", str(stale)]) == 0
    assert main(["--check", "--output", str(stale)]) == 0


def test_every_route_but_health_documents_its_problems() -> None:
    document = json.loads(render())
    for path, methods in document["paths"].items():
        for method, operation in methods.items():
            if path == "/health":
                continue
            responses = operation["responses"]
            assert "401" in responses, (method, path)
            assert "application/problem+json" in responses["401"]["content"], (method, path)
