"""Every `keeper` command, with bad input and with good input but no broker: the exit code
the README documents, one line on stderr (a JSON error with --json), never a traceback.

The commands are taken from the typer app itself: a new command without its cases here
fails `test_every_command_has_its_cases`. Bad input must be refused before any network
call: the broker URL names a closed port, so a check made only after connecting would
exit 4 instead of 2."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import typer.main
from typer.testing import CliRunner, Result

from keeper_cli.app import app
from keeper_cli.errors import ExitCode
from keeper_cli.json_documents import schema_id

VM_ID = "7d4e5a40-3c43-4a8f-9c40-1b3a2b3c4d5e"

BAD_INPUT: dict[str, list[list[str]]] = {
    "hosts": [["--timeout", "0"], ["--timeout", "soon"], ["surplus"]],
    "vm enable-tpm": [
        ["bad name!", "--guest-os", "windows-11"],
        ["vm1"],  # --guest-os missing
        ["vm1", "--guest-os", "windows-11", "--firmware", "coreboot"],
        ["vm1", "--guest-os", "windows-11", "--vm-id", "not-a-uuid"],
        ["vm1", "--guest-os", "windows-11", "--memory-mib", "1"],
        ["vm1", "--guest-os", "w" * 65],
        ["vm1", "--guest-os", "windows-11", "--arch", "a" * 33],
    ],
    "vm start": [
        ["vm1"],  # --host missing
        ["bad name!", "--host", "h"],
        ["vm1", "--host", "Not A Host"],
        ["vm1", "--host", "h", "--timeout", "-5"],
        ["vm1", "--host", "h", "--domain-xml", "{missing_dir}/domain.xml"],
        ["vm1", "--host", "h", "--domain-xml", "{existing}"],  # not XML
    ],
    "vm shutdown": [[], ["vm1", "bad name!"], ["vm1", "--timeout", "nan"]],
    "vm poweroff": [[], ["bad name!"]],
    "vm adopt": [["bad name!"], ["vm1", "--host", "UPPER"], ["vm1", "--guest-os", "w" * 65]],
    "vm restore": [
        ["vm1", "--host", "h"],  # neither --version nor --snapshot
        ["vm1", "--host", "h", "--version", "1", "--snapshot", "s"],
        ["vm1", "--host", "h", "--version", "0"],
        ["vm1", "--host", "h", "--snapshot", "with space"],
        ["vm1", "--host", "h", "--snapshot", "s", "--kind", "tpm"],
        ["vm1", "--host", "h", "--version", "1", "--kind", "bios"],
        ["vm1", "--version", "1"],  # --host missing
    ],
    "vm snapshot": [
        ["vm1", "--name", "a b"],
        ["vm1", "--name", "-leading-dash"],
        ["bad name!"],
        ["vm1", "--memory", "yes"],
    ],
    "vm snapshot-delete": [["vm1"], ["vm1", "a b"]],
    "vm revert": [["vm1"], ["vm1", "a b"], ["bad name!", "s1"], ["vm1", "s1", "--memory"]],
    "vm delete-state": [["bad name!"], ["vm1", "--reason", "r" * 300]],
    "vm disable-tpm": [["bad name!"], ["vm1", "--reason", "r" * 300]],
    "vm clone": [
        ["vm1", "not-a-uuid", "--tpm", "copy"],
        ["vm1", VM_ID, "--tpm", "maybe"],
        ["vm1", VM_ID],  # --tpm missing
    ],
    "vm export": [
        ["vm1"],  # --output missing
        ["vm1", "-o", "{missing_dir}/vm.bundle", "--passphrase-file", "{passphrase}"],
        ["vm1", "-o", "{existing}", "--passphrase-file", "{passphrase}"],  # no --force
        ["vm1", "-o", "{tmp}", "--passphrase-file", "{passphrase}", "--force"],  # a directory
        ["vm1", "-o", "{new}", "--passphrase-file", "{empty}"],
        ["vm1", "-o", "{new}", "--passphrase-file", "{short}"],
        ["vm1", "-o", "{new}", "--passphrase-file", "{missing_dir}/passphrase"],
        ["vm1", "-o", "{new}"],  # no passphrase anywhere, and no terminal to ask
    ],
    "vm import": [
        ["{missing_dir}/vm.bundle", "--passphrase-file", "{passphrase}"],
        ["{tmp}", "--passphrase-file", "{passphrase}"],
        ["{existing}", "--passphrase-file", "{short}"],
        ["{existing}", "--passphrase-file", "{passphrase}", "--vm-id", "nope"],
    ],
    "vm list": [["vm1"], ["--timeout", "100000"]],
    "vm show": [[], ["bad name!"]],
    "vm status": [["bad name!"], ["vm1", "vm2"]],
    "vm history": [[], ["bad name!"]],
    "vm ek": [[], ["bad name!"], ["vm1", "vm2"]],
    "vm accept-tpm": [[], ["bad name!"], ["vm1", "vm2"]],
    "vm snapshots": [[], ["bad name!"]],
    "vm create": [
        ["vm1"],  # --template missing
        ["bad name!", "--template", "t1"],
        ["vm1", "--template", "bad name!"],
        ["vm1", "--template", "t1", "--vm-id", "not-a-uuid"],
    ],
    "template create": [
        ["t1"],  # neither --from-vm nor --guest-os
        ["t1", "--from-vm", "vm1", "--guest-os", "windows-11"],
        ["t1", "--from-vm", "vm1", "--secure-boot"],  # the spec is the VM's
        ["bad name!", "--guest-os", "windows-11"],
        ["t1", "--from-vm", "bad name!"],
        ["t1", "--guest-os", "w" * 65],
        ["t1", "--guest-os", "windows-11", "--firmware", "coreboot"],
        ["t1", "--guest-os", "windows-11", "--memory-mib", "1"],
        ["t1", "--guest-os", "windows-11", "--arch", "a" * 33],
    ],
    "template list": [["t1"], ["--timeout", "0"]],
    "template show": [[], ["bad name!"], ["t1", "t2"]],
    "template delete": [[], ["bad name!"], ["t1", "t2"]],
}
"""Each command's bad inputs; every one must exit 2 before any network call."""

GOOD_INPUT: dict[str, list[str]] = {
    "hosts": [],
    "vm enable-tpm": ["vm1", "--guest-os", "windows-11", "--vm-id", VM_ID],
    "vm start": ["vm1", "--host", "host-a"],
    "vm shutdown": ["vm1", "vm2"],
    "vm poweroff": ["vm1"],
    "vm adopt": ["vm1", "--host", "host-a"],
    "vm restore": ["vm1", "--host", "host-a", "--snapshot", "s1", "--yes"],
    "vm snapshot": ["vm1", "--name", "s1"],
    "vm snapshot-delete": ["vm1", "s1", "--yes"],
    "vm revert": ["vm1", "s1", "--yes"],
    "vm delete-state": ["vm1", "--yes"],
    "vm disable-tpm": ["vm1", "--yes"],
    "vm clone": ["vm1", VM_ID, "--tpm", "fresh"],
    "vm export": ["vm1", "-o", "{new}", "--passphrase-file", "{passphrase}"],
    "vm import": ["{existing}", "--passphrase-file", "{passphrase}"],
    "vm list": [],
    "vm show": ["vm1"],
    "vm status": [],
    "vm history": [VM_ID],
    "vm ek": ["vm1"],
    "vm accept-tpm": ["vm1", "--yes"],
    "vm snapshots": ["vm1"],
    "vm create": ["vm1", "--template", "t1", "--vm-id", VM_ID],
    "template create": ["t1", "--guest-os", "windows-11", "--secure-boot"],
    "template list": [],
    "template show": ["t1"],
    "template delete": ["t1", "--yes"],
}
"""Input each command accepts: with no broker it gets as far as connecting (exit 4)."""


def _leaf_commands() -> Iterator[str]:
    root = typer.main.get_command(app)

    def walk(command: object, path: list[str]) -> Iterator[str]:
        children = getattr(command, "commands", None)
        if not children:
            yield " ".join(path)
            return
        for name, child in children.items():
            yield from walk(child, [*path, name])

    yield from walk(root, [])


COMMANDS = sorted(_leaf_commands())


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def files(tmp_path: Path) -> dict[str, str]:
    """What the placeholders in the cases name."""
    (tmp_path / "existing").write_bytes(b"not really a bundle")
    (tmp_path / "empty").write_text("\n", encoding="utf-8")
    (tmp_path / "short").write_text("short\n", encoding="utf-8")
    (tmp_path / "passphrase").write_text("correct horse battery staple\n", encoding="utf-8")
    return {
        "tmp": str(tmp_path),
        "existing": str(tmp_path / "existing"),
        "new": str(tmp_path / "new.bundle"),
        "empty": str(tmp_path / "empty"),
        "short": str(tmp_path / "short"),
        "passphrase": str(tmp_path / "passphrase"),
        "missing_dir": str(tmp_path / "missing"),
    }


def invoke(command: str, arguments: list[str], files: dict[str, str]) -> Result:
    filled = [argument.format(**files) for argument in arguments]
    env = {
        "KEEPER_AMQP_URL": f"amqp://guest:guest@127.0.0.1:{_closed_port()}/",
        "KEEPER_AMQP_URLS": "",
        "KEEPER_BUNDLE_PASSPHRASE": "",
    }
    return CliRunner().invoke(app, [*command.split(), *filled], env=env)


def assert_one_line(result: Result, code: ExitCode) -> None:
    assert result.exit_code == code, (result.exit_code, result.output)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines


def assert_json_error(result: Result, code: ExitCode) -> None:
    assert result.exit_code == code, (result.exit_code, result.output)
    assert result.stdout == ""
    (line,) = result.stderr.splitlines()
    error = json.loads(line)
    assert error == {
        "schema": schema_id("error"),
        "error": code.label,
        "exit_code": int(code),
        "message": error["message"],
    }
    assert error["message"]


def test_every_command_has_its_cases() -> None:
    assert set(BAD_INPUT) == set(COMMANDS)
    assert set(GOOD_INPUT) == set(COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_waits_at_most_timeout_and_speaks_json(command: str) -> None:
    """Every command asks the services, so every one takes --timeout and --json."""
    root = typer.main.get_command(app)
    leaf = root
    for part in command.split():
        leaf = leaf.commands[part]  # type: ignore[attr-defined]
    options = {opt for param in leaf.params for opt in getattr(param, "opts", [])}
    assert {"--timeout", "--json"} <= options


@pytest.mark.parametrize(
    ("command", "arguments"),
    [(command, arguments) for command in COMMANDS for arguments in BAD_INPUT.get(command, [])],
)
def test_bad_input_exits_2_in_one_line(
    command: str, arguments: list[str], files: dict[str, str]
) -> None:
    assert_one_line(invoke(command, arguments, files), ExitCode.USAGE)
    assert_json_error(invoke(command, [*arguments, "--json"], files), ExitCode.USAGE)


@pytest.mark.parametrize("command", COMMANDS)
def test_good_input_without_a_broker_exits_4_in_one_line(
    command: str, files: dict[str, str]
) -> None:
    result = invoke(command, GOOD_INPUT[command], files)
    assert_one_line(result, ExitCode.UNREACHABLE)
    assert "cannot reach RabbitMQ" in result.stderr
    assert_json_error(
        invoke(command, [*GOOD_INPUT[command], "--json"], files), ExitCode.UNREACHABLE
    )


@pytest.mark.parametrize(
    ("variables", "named"),
    [
        ({"KEEPER_AMQP_URL": "notaurl"}, "KEEPER_AMQP_URL"),
        ({"KEEPER_AMQP_URL": "http://guest:guest@127.0.0.1:5672/"}, "KEEPER_AMQP_URL"),
        ({"KEEPER_AMQP_URL": "amqp://guest:s3cret@127.0.0.1:port/"}, "KEEPER_AMQP_URL"),
        ({"KEEPER_AMQP_URLS": "amqp://127.0.0.1:1/,notaurl"}, "KEEPER_AMQP_URLS"),
        ({"KEEPER_TIMEOUT_S": "soon"}, "KEEPER_TIMEOUT_S"),
        ({"KEEPER_TIMEOUT_S": "-1"}, "KEEPER_TIMEOUT_S"),
        ({"KEEPER_UPGRADE_LEVEL": "latest"}, "KEEPER_UPGRADE_LEVEL"),
        ({"KEEPER_UPGRADE_LEVEL": "0.0.1"}, "KEEPER_UPGRADE_LEVEL"),
    ],
)
def test_bad_environment_fails_at_once_naming_the_variable(
    variables: dict[str, str], named: str
) -> None:
    result = CliRunner().invoke(app, ["vm", "list"], env={"KEEPER_AMQP_URLS": "", **variables})
    assert_one_line(result, ExitCode.USAGE)
    assert named in result.stderr
    assert "s3cret" not in result.output  # a URL's password is never repeated


def test_a_bad_amqp_url_option_is_named() -> None:
    result = CliRunner().invoke(app, ["--amqp-url", "notaurl", "hosts"])
    assert_one_line(result, ExitCode.USAGE)
    assert "--amqp-url" in result.stderr


def test_version_and_short_help() -> None:
    version = CliRunner().invoke(app, ["--version"])
    assert version.exit_code == 0
    assert version.stdout.startswith("keeper ")
    for arguments in (["-h"], ["vm", "-h"], ["vm", "start", "-h"]):
        helped = CliRunner().invoke(app, arguments)
        assert helped.exit_code == 0, helped.output
        assert "Usage:" in helped.stdout


def test_root_help_lists_options_environment_and_exit_codes() -> None:
    text = CliRunner().invoke(app, ["--help"]).stdout
    for expected in ("--amqp-url", "--version", "KEEPER_AMQP_URL", "KEEPER_TIMEOUT_S"):
        assert expected in text
    for code in ExitCode:
        assert f"{int(code):>3}  {code.meaning}" in text
    assert "<bool>" not in CliRunner().invoke(app, ["vm", "enable-tpm", "-h"]).stdout
