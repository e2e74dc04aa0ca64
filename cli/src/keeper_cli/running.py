"""Running one command's requests: its settings (global options over ``KEEPER_*``), the
connection to RabbitMQ, and every expected failure turned into one line (or a JSON error
with ``--json``) and an exit code.

A command body builds an ``async def work(settings)`` and hands it to :func:`run`; inside,
``async with connected(settings, needs=...)`` gives a :class:`KeeperClient`. :func:`run`
reads ``--json`` and ``--timeout`` from the command's own parameters (named ``as_json``
and ``timeout``), so a command only has to declare them.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

import aio_pika.exceptions
import aiormq.exceptions
import pamqp.exceptions
import typer
import yarl
from pydantic import ValidationError

from keeper_cli import inputs, output
from keeper_cli.config import CliSettings
from keeper_cli.errors import CliError, ExitCode
from keeper_cli.typer_click import Context, get_current_context
from keeper_shared.bus.client import (
    BusClient,
)
from keeper_shared.bus.topology import POLICY, POLICY_COMMANDS, STATE_STORE, STATE_STORE_COMMANDS
from keeper_shared.bus.upgrade_levels import configured_level
from keeper_shared.keeper_client import views
from keeper_shared.keeper_client.client import KeeperClient, client_origin
from keeper_shared.keeper_client.outcomes import REQUEST_FAILURES, request_failure
from keeper_shared.messages.releases import UnknownReleaseError
from keeper_shared.runtime.tls_failure import NOT_TLS, describe_tls_failure

T = TypeVar("T")

CONNECT_TIMEOUT_S = 15.0
"""How long the first connection to RabbitMQ may take before the broker counts as down."""


@dataclass(frozen=True)
class GlobalOptions:
    """What ``keeper [OPTIONS] COMMAND`` was given before the command (kept in the click
    context's ``obj``)."""

    amqp_urls: tuple[str, ...] = ()
    """``--amqp-url``, once per broker node; empty: the environment's."""


def settings_for(ctx: Context) -> CliSettings:
    """The settings for the command of ``ctx``: environment, then the global options, then
    the command's ``--timeout``. A bad value is a usage error naming where it came from."""
    options = ctx.find_object(GlobalOptions) or GlobalOptions()
    overrides: dict[str, Any] = {}
    if options.amqp_urls:
        overrides["amqp_urls"] = list(options.amqp_urls)
    timeout = ctx.params.get("timeout")
    if timeout is not None:
        overrides["timeout_s"] = timeout
    try:
        # Checked here so a release this build cannot talk to is a usage error, not a crash.
        configured_level()
    except ValidationError as error:
        raise inputs.model_error(error, {"upgrade_level": "KEEPER_UPGRADE_LEVEL"}) from None
    except UnknownReleaseError as error:
        raise inputs.usage(f"KEEPER_UPGRADE_LEVEL: {error}") from None
    try:
        return CliSettings(**overrides)
    except ValidationError as error:
        raise inputs.model_error(
            error,
            {
                "amqp_url": "KEEPER_AMQP_URL",
                "amqp_urls": "--amqp-url" if options.amqp_urls else "KEEPER_AMQP_URLS",
                "timeout_s": "--timeout" if timeout is not None else "KEEPER_TIMEOUT_S",
            },
        ) from None


def run(work: Callable[[CliSettings], Coroutine[Any, Any, T]], *, follow: str | None = None) -> T:
    """Run ``work`` and turn every expected failure into a message and an exit code.

    ``follow`` says how to follow a command that changes something (e.g. "`keeper vm show
    web-01`"), for a time-out or Ctrl-C after its request may have been sent; None for a
    command that only reads."""
    ctx = get_current_context()
    as_json = bool(ctx.params.get("as_json"))
    settings = settings_for(ctx)

    def fail(message: str, code: ExitCode) -> NoReturn:
        output.failure(message, code, as_json=as_json)
        raise typer.Exit(int(code))

    goes_on = (
        f"it may still be carried out server side; follow it with {follow}"
        if follow
        else "it only read, nothing was changed"
    )
    try:
        return asyncio.run(work(settings))
    except CliError as error:
        fail(str(error), error.code)
    except REQUEST_FAILURES as error:
        code, message = request_failure(error, goes_on=goes_on)
        fail(message, code)
    except (
        aio_pika.exceptions.AMQPError,
        pamqp.exceptions.PAMQPException,
        ConnectionError,
    ) as error:
        broken = broker_failure(error, settings)
        fail(str(broken), broken.code)
    except KeyboardInterrupt:
        if follow:
            fail(
                f"interrupted: a request already sent goes on server side; follow it with {follow}",
                ExitCode.INTERRUPTED,
            )
        fail("interrupted; nothing was changed", ExitCode.INTERRUPTED)


def _where(settings: CliSettings) -> str:
    """host:port of each broker URL, never the credentials."""
    return ", ".join(f"{url.host}:{url.port}" for url in map(yarl.URL, settings.amqp_endpoints))


def _user(settings: CliSettings) -> str:
    return yarl.URL(settings.amqp_endpoints[0]).user or "guest"


def _closing_frame(error: BaseException) -> Any:
    """The broker's Connection.Close or Channel.Close frame an error carries, if any."""
    for part in error.args:
        if hasattr(part, "reply_code") and hasattr(part, "reply_text"):
            return part
    return None


def _broker_said(error: BaseException) -> str:
    """What the broker said (its reply text), without the Python wrapping."""
    frame = _closing_frame(error)
    if frame is not None:
        return str(frame.reply_text)
    said = [str(part) for part in error.args if isinstance(part, str | int)]
    return " ".join(said) or type(error).__name__


NOT_ALLOWED = 530
"""AMQP's reply code when the user may not use the virtual host."""

ACCESS_REFUSED = 403
"""AMQP's reply code for a missing permission."""


def _reset_hint(settings: CliSettings) -> str:
    """Why a broker may have dropped the connection unexplained: it takes TLS only and the
    URL is plain, or (TLS 1.3 checks a client certificate after the client's side of the
    handshake is done, so a refusal can arrive as a bare reset) it refused the client
    certificate."""
    urls = [yarl.URL(url) for url in settings.amqp_endpoints]
    if any(url.scheme == "amqp" for url in urls):
        return "; if it takes TLS only, use amqps://…/?cafile=CA-FILE"
    if any("certfile" in url.query for url in urls):
        return (
            "; if it refused the client certificate, check certfile= and keyfile= (signed "
            "by a CA the broker trusts, not expired)"
        )
    return ""


def broker_failure(error: BaseException, settings: CliSettings) -> CliError:
    """The CLI error for a failure to connect or to use RabbitMQ: a refused login and a
    missing permission are told as such, anything else as a broker out of reach."""
    where, user = _where(settings), _user(settings)
    if isinstance(
        error, aiormq.exceptions.AuthenticationError | aiormq.exceptions.ProbableAuthenticationError
    ):
        return CliError(
            f"RabbitMQ at {where} refused the login of user {user!r}: check the user and "
            "password in --amqp-url or KEEPER_AMQP_URL",
            ExitCode.DENIED,
        )
    tls_reason = describe_tls_failure(error)
    if tls_reason is not None:
        return CliError(
            f"TLS with RabbitMQ at {where} failed: {tls_reason}",
            ExitCode.UNREACHABLE if tls_reason == NOT_TLS else ExitCode.DENIED,
        )
    frame = _closing_frame(error)
    code = getattr(frame, "reply_code", None)
    if isinstance(error, aiormq.exceptions.ConnectionNotAllowed) or code == NOT_ALLOWED:
        return CliError(
            f"RabbitMQ at {where} does not let user {user!r} in ({_broker_said(error)}): "
            "permission denied on its virtual host",
            ExitCode.DENIED,
        )
    if isinstance(error, aiormq.exceptions.ChannelAccessRefused) or code == ACCESS_REFUSED:
        return CliError(
            f"RabbitMQ at {where} denied user {user!r} a permission ({_broker_said(error)})",
            ExitCode.DENIED,
        )
    if isinstance(error, aiormq.exceptions.ChannelNotFoundEntity):
        # The client only checks that the keeper's exchanges exist; the services make them.
        return CliError(
            f"RabbitMQ at {where} has none of vTPM Keeper's exchanges ({_broker_said(error)}): "
            "no keeper service has run against it yet",
            ExitCode.UNREACHABLE,
        )
    hint = _reset_hint(settings) if "reset" in _broker_said(error).lower() else ""
    return CliError(
        f"cannot reach RabbitMQ at {where} (--amqp-url or KEEPER_AMQP_URL; for the local "
        f"stack: `make stack-status`){hint}",
        ExitCode.UNREACHABLE,
    )


@contextlib.asynccontextmanager
async def connected(settings: CliSettings, *, needs: tuple[str, ...]) -> AsyncIterator[Any]:
    """A connected client; checks that the services in ``needs`` (``policy``, ``store``)
    have a consumer, so a missing one fails at once."""
    try:
        bus = await asyncio.wait_for(
            BusClient.connect(
                settings.amqp_endpoints,
                source=f"client/keeper-{getpass.getuser()}",
                origin=client_origin(settings.amqp_endpoints),
                declare_exchanges=False,
            ),
            timeout=CONNECT_TIMEOUT_S,
        )
    except (
        aio_pika.exceptions.AMQPError,
        pamqp.exceptions.PAMQPException,  # e.g. a virtual host refused while opening
        OSError,
        TimeoutError,
    ) as error:
        raise broker_failure(error, settings) from None
    try:
        for service in needs:
            await _require_consumer(bus, service, settings)
        yield KeeperClient.configured(bus, settings)
    finally:
        await bus.close(2.0)


async def _require_consumer(bus: BusClient, service: str, settings: CliSettings) -> None:
    if service == "store":
        if settings.store_target != STATE_STORE:
            return  # a private store (tests): its queue has another name
        queue_name, label = STATE_STORE_COMMANDS.name, "state store"
    else:
        if settings.policy_target != POLICY:
            return  # a private policy (tests): its queue has another name
        queue_name, label = POLICY_COMMANDS.name, "policy service"
    channel = await bus.connection.channel()
    try:
        queue = await channel.declare_queue(queue_name, passive=True)
        consumers = queue.declaration_result.consumer_count
    except aiormq.exceptions.ChannelAccessRefused as error:
        raise broker_failure(error, settings) from None
    except aio_pika.exceptions.ChannelClosed:
        consumers = 0
    finally:
        with contextlib.suppress(Exception):
            await channel.close()
    if not consumers:
        raise CliError(
            f"no {label} is running (nothing consumes {queue_name})", ExitCode.UNREACHABLE
        )


RESOLVING = ("policy", "store")
"""The services a VM reference needs: policy knows the registered VMs, the store those
that only have stored state (imported or cloned, not registered yet)."""


async def resolve(client: KeeperClient, reference: str) -> str:
    """The VM id of a VM id or name; unknown VMs end the command (exit 3)."""
    matches = await views.resolve_vm(client, reference)
    if not matches:
        template = await views.template_named(client, reference)
        if template is not None:
            raise CliError(
                f"{reference!r} is a template, not a VM: create a VM from it "
                f"(`keeper vm create NAME --template {template.name}`)",
                ExitCode.REFUSED,
            )
        raise CliError(
            f"unknown VM {reference!r} (see `keeper vm list`; enable its TPM first)",
            ExitCode.UNKNOWN_VM,
        )
    if len(matches) > 1:
        raise CliError(
            f"{len(matches)} VMs are named {reference!r}: give the VM id ({', '.join(matches)})",
            ExitCode.USAGE,
        )
    return matches[0]
