"""The tokens file: hashes only, roles checked, broken lines named."""

from __future__ import annotations

from pathlib import Path

import pytest

from keeper_api.tokens import Role, TokenFileError, Tokens, main, token_hash


def test_a_token_is_known_by_its_hash_only(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text(f"# ops\nalice operator {token_hash('s3cret')}  # on call\n\n")
    tokens = Tokens.load(path)
    found = tokens.caller("s3cret")
    assert found is not None
    assert (found.name, found.role) == ("alice", Role.OPERATOR)
    assert tokens.caller("s3cret ") is None
    assert "s3cret" not in path.read_text()


@pytest.mark.parametrize(
    ("line", "complaint"),
    [
        ("alice operator", "expected NAME ROLE SHA256-HEX"),
        (f"alice admin {token_hash('x')}", "role must be reader or operator"),
        ("alice reader plain-token-not-a-hash", "not a lower-case hex SHA-256"),
    ],
)
def test_a_broken_line_is_named(tmp_path: Path, line: str, complaint: str) -> None:
    path = tmp_path / "tokens"
    path.write_text(f"\n{line}\n")
    with pytest.raises(TokenFileError, match=f"{path}:2: {complaint}"):
        Tokens.load(path)


def test_main_prints_the_line_and_the_token_once(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["carol", "reader"]) == 0
    captured = capsys.readouterr()
    token = captured.err.split(": ", 1)[1].strip()
    assert captured.out == f"carol reader {token_hash(token)}\n"
    assert main(["carol", "root"]) == 2
