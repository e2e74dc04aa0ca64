"""How `run` tells each failure a command's requests meet: the exit code, one line naming
what happened and, for a command that changes something, how to follow it; never a
traceback. Each case runs a real command function through the real click machinery; only
the failure is staged."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import aiormq.exceptions
import pytest
import typer
from pamqp import commands
from pamqp.exceptions import AMQPInternalError
from typer.testing import CliRunner

from keeper_cli.command_group import KeeperGroup
from keeper_cli.config import CliSettings
from keeper_cli.errors import ExitCode
from keeper_cli.options import JsonOption, TimeoutOption
from keeper_cli.running import run
from keeper_shared.bus.client import CallTimeoutError, NoRouteError
from keeper_shared.keeper_client.client import KeeperRequestError

FOLLOW = "`keeper vm show web-01`"


def _app(failure: BaseException, *, follow: str | None) -> typer.Typer:
    """A one-command app whose request fails with ``failure``."""
    app = typer.Typer(cls=KeeperGroup, rich_markup_mode=None)

    async def work(_settings: CliSettings) -> None:
        raise failure

    @app.command("act")
    def act(timeout: TimeoutOption = None, as_json: JsonOption = False) -> None:
        run(work, follow=follow)

    @app.command("other")
    def other() -> None:  # a second command keeps "act" a subcommand
        raise AssertionError("not called")

    return app


def _invoke(failure: BaseException, *arguments: str, follow: str | None = FOLLOW) -> Any:
    return CliRunner().invoke(
        _app(failure, follow=follow),
        ["act", *arguments],
        env={"KEEPER_AMQP_URL": "amqp://alice:pw@broker.example:5672/", "KEEPER_AMQP_URLS": ""},
    )


def _close(code: int, text: str) -> commands.Connection.Close:
    return commands.Connection.Close(reply_code=code, reply_text=text)


CASES: list[tuple[Callable[[], BaseException], ExitCode, str]] = [
    (
        lambda: KeeperRequestError("start on h1 failed: no reply within 30 s", timed_out=True),
        ExitCode.TIMEOUT,
        f"may still be carried out server side; follow it with {FOLLOW}",
    ),
    (lambda: KeeperRequestError("no such snapshot"), ExitCode.REFUSED, "no such snapshot"),
    (
        lambda: CallTimeoutError("vm.place to policy got no reply within 120.0 s"),
        ExitCode.TIMEOUT,
        "no answer in time",
    ),
    (lambda: NoRouteError("vm.place: no queue is bound"), ExitCode.UNREACHABLE, "no queue"),
    (
        lambda: aiormq.exceptions.ProbableAuthenticationError("ACCESS_REFUSED"),
        ExitCode.DENIED,
        "refused the login of user 'alice'",
    ),
    (
        lambda: aiormq.exceptions.ChannelAccessRefused("ACCESS_REFUSED - no configure"),
        ExitCode.DENIED,
        "denied user 'alice' a permission",
    ),
    (
        lambda: AMQPInternalError("one of", _close(530, "NOT_ALLOWED - access to vhost '/'")),
        ExitCode.DENIED,
        "NOT_ALLOWED - access to vhost '/'",
    ),
    (
        lambda: ConnectionResetError("reset by peer"),
        ExitCode.UNREACHABLE,
        "cannot reach RabbitMQ at broker.example:5672",
    ),
    (
        KeyboardInterrupt,
        ExitCode.INTERRUPTED,
        f"a request already sent goes on server side; follow it with {FOLLOW}",
    ),
    (lambda: ValueError("a bug"), ExitCode.REFUSED, "unexpected failure (ValueError)"),
]


@pytest.mark.parametrize(("make", "code", "said"), CASES)
def test_each_failure_has_its_exit_code_and_one_line(
    make: Callable[[], BaseException], code: ExitCode, said: str
) -> None:
    result = _invoke(make())
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    (line,) = result.stderr.splitlines()
    assert line.startswith("error: ")
    assert said in line
    assert "pw@" not in line  # the URL's password is never shown


@pytest.mark.parametrize(("make", "code", "said"), CASES)
def test_with_json_each_failure_is_one_json_error(
    make: Callable[[], BaseException], code: ExitCode, said: str
) -> None:
    import json

    result = _invoke(make(), "--json")
    assert result.exit_code == code
    assert result.stdout == ""
    error = json.loads(result.stderr)
    assert (error["error"], error["exit_code"]) == (code.label, int(code))
    assert said in error["message"]


def test_an_interrupted_read_says_nothing_changed() -> None:
    result = _invoke(KeyboardInterrupt(), follow=None)
    assert result.exit_code == ExitCode.INTERRUPTED
    assert "nothing was changed" in result.stderr
