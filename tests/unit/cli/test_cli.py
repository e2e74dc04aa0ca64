"""`keeper` argument handling, exit codes and messages, without any server."""

from __future__ import annotations

import socket

import pytest
from typer.testing import CliRunner

from keeper_cli.app import app
from keeper_cli.config import CliSettings
from keeper_cli.errors import ExitCode
from keeper_cli.output import age

runner = CliRunner()


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def nothing_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    port = _closed_port()
    monkeypatch.setenv("KEEPER_AMQP_URL", f"amqp://guest:guest@127.0.0.1:{port}/")


def test_help_lists_every_command() -> None:
    result = runner.invoke(app, ["vm", "--help"])
    assert result.exit_code == 0
    for command in (
        "enable-tpm",
        "start",
        "shutdown",
        "poweroff",
        "list",
        "show",
        "status",
        "history",
        "restore",
        "snapshot",
        "clone",
        "export",
        "import",
        "delete-state",
        "disable-tpm",
        "adopt",
        "create",
    ):
        assert command in result.output
    assert "hosts" in runner.invoke(app, ["--help"]).output
    assert "template" in runner.invoke(app, ["--help"]).output


def test_defaults_point_at_the_local_stack(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("KEEPER_AMQP_URL", "KEEPER_AMQP_URLS", "KEEPER_STACK_RABBITMQ_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("KEEPER_STACK_RUN_DIR", "/srv/stack")
    settings = CliSettings()
    # Over TLS, trusting the stack's own CA.
    assert settings.amqp_url == "amqps://guest:guest@127.0.0.1:28672/?cafile=/srv/stack/tls/ca.pem"
    assert settings.amqp_endpoints == [settings.amqp_url]


def test_redis_variables_of_earlier_releases_are_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI asks policy and the store over the bus; a Redis address left in an operator's
    environment (even one an earlier release would have refused) changes nothing."""
    monkeypatch.setenv("KEEPER_REDIS_URL", "redis://127.0.0.1:1/0")
    monkeypatch.setenv("KEEPER_REDIS_SENTINELS", "not-an-address")
    monkeypatch.setenv("KEEPER_HOST_LOST_AFTER_S", "-1")
    settings = CliSettings()
    assert not any(name.startswith("redis") for name in CliSettings.model_fields)
    assert "host_lost_after_s" not in CliSettings.model_fields
    assert settings.amqp_endpoints


@pytest.mark.usefixtures("nothing_runs")
def test_status_never_asks_redis(monkeypatch: pytest.MonkeyPatch) -> None:
    """With RabbitMQ down and a Redis address set, what is named is the broker: the CLI has
    no Redis connection to try."""
    monkeypatch.setenv("KEEPER_REDIS_URL", "redis://127.0.0.1:1/0")
    for arguments in (["vm", "status"], ["hosts"], ["vm", "history", "vm1"]):
        result = runner.invoke(app, arguments)
        assert result.exit_code == ExitCode.UNREACHABLE
        assert "cannot reach RabbitMQ" in result.stderr
        assert "Redis" not in result.stderr


@pytest.mark.parametrize(
    "arguments",
    [
        ["vm", "start", "some-vm"],  # --host missing
        ["vm", "restore", "some-vm", "--host", "h"],  # neither --version nor --snapshot
        ["vm", "restore", "some-vm", "--host", "h", "--version", "1", "--snapshot", "s"],
        ["vm", "clone", "some-vm", "not-a-uuid", "--tpm", "copy"],
        ["vm", "clone", "some-vm", "7d4e5a40-3c43-4a8f-9c40-1b3a2b3c4d5e", "--tpm", "maybe"],
        ["vm", "enable-tpm", "bad name!", "--guest-os", "windows-11"],
        ["vm", "enable-tpm", "vm1", "--guest-os", "windows-11", "--firmware", "coreboot"],
    ],
)
def test_bad_arguments_exit_2(arguments: list[str]) -> None:
    result = runner.invoke(app, arguments)
    assert result.exit_code == ExitCode.USAGE, result.output


@pytest.mark.usefixtures("nothing_runs")
@pytest.mark.parametrize(
    ("arguments", "what"),
    [
        (["vm", "status"], "RabbitMQ"),
        (["hosts", "--json"], "RabbitMQ"),
        (["vm", "start", "vm1", "--host", "h"], "RabbitMQ"),
        (["vm", "enable-tpm", "vm1", "--guest-os", "windows-11"], "RabbitMQ"),
        (["vm", "enable-tpm", "vm1", "--guest-os", "windows-11", "--encrypt-state"], "RabbitMQ"),
    ],
)
def test_an_unreachable_server_is_named(arguments: list[str], what: str) -> None:
    result = runner.invoke(app, arguments)
    assert result.exit_code == ExitCode.UNREACHABLE
    assert f"cannot reach {what}" in result.stderr
    assert result.stdout == ""


def test_ages_read_well() -> None:
    assert age(None) is None
    assert age(5) == "5s"
    assert age(600) == "10m"
    assert age(3 * 3600) == "3h"
    assert age(3 * 86400) == "3d"
