"""``keeper vm start --domain-xml``: the file is read and checked before anything is sent,
so a bad one exits 2 (bad arguments) even with no broker to reach."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from keeper_cli.app import app
from keeper_cli.errors import ExitCode
from keeper_shared.domain_document import MAX_DOMAIN_XML_CHARS

runner = CliRunner()


@pytest.mark.parametrize(
    ("content", "shown"),
    [
        (b"<!DOCTYPE domain [<!ENTITY x 'y'>]><domain>&x;</domain>", "DOCTYPE"),
        (b"name: not xml", "not well-formed"),
        (b"<network/>", "root element is <network>"),
        (b"<domain>" + b" " * MAX_DOMAIN_XML_CHARS + b"</domain>", "more than"),
        (b"<domain>\xff</domain>", "utf-8"),
    ],
    ids=["doctype", "not-xml", "not-a-domain", "huge", "not-utf8"],
)
def test_a_bad_domain_xml_file_is_refused_before_any_network_call(
    tmp_path: Path, content: bytes, shown: str
) -> None:
    domain_file = tmp_path / "domain.xml"
    domain_file.write_bytes(content)

    result = runner.invoke(
        app, ["vm", "start", "vm1", "--host", "h", "--domain-xml", str(domain_file)]
    )

    assert result.exit_code == ExitCode.USAGE, result.output
    assert shown in result.output


def test_a_missing_domain_xml_file_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.xml"

    result = runner.invoke(app, ["vm", "start", "vm1", "--host", "h", "--domain-xml", str(missing)])

    assert result.exit_code == ExitCode.USAGE
    assert "No such file" in result.output
