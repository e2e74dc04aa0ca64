"""AMQP over TLS against the session's node (TLS only, client certificates optional): a
client that trusts the CA gets in, with or without a certificate of its own; the wrong CA,
a certificate from another CA, a wrong password and a plain connection are each refused,
and the CLI and the services say which of these it was in one line."""

from __future__ import annotations

import asyncio

import aiormq.exceptions
import pytest
import yarl
from typer.testing import CliRunner

from keeper_cli.app import app
from keeper_cli.errors import ExitCode
from keeper_devtools.tls import TlsFiles
from keeper_shared.bus.client import BusClient
from keeper_shared.runtime.startup import wait_for_dependency
from keeper_shared.runtime.tls_failure import (
    CLIENT_REFUSED,
    NOT_TLS,
    TlsHandshakeError,
    describe_tls_failure,
)

pytestmark = pytest.mark.rabbit

CONNECT_TIMEOUT_S = 30.0


def _with_ca(url: str, ca: str) -> str:
    return str(yarl.URL(url).update_query(cafile=ca))


def _with_client_certificate(url: str, tls: TlsFiles) -> str:
    return str(
        yarl.URL(url).update_query(certfile=str(tls.client_cert), keyfile=str(tls.client_key))
    )


async def _connect(url: str) -> BusClient:
    return await asyncio.wait_for(
        BusClient.connect(url, source="test/tls", origin="test"), CONNECT_TIMEOUT_S
    )


async def _refusal(url: str) -> BaseException:
    with pytest.raises(ConnectionError) as refused:
        await _connect(url)  # never connects, so there is nothing to close
    return refused.value


def test_the_session_broker_takes_tls_only(rabbitmq_url: str) -> None:
    url = yarl.URL(rabbitmq_url)
    assert url.scheme == "amqps"
    assert "cafile" in url.query


@pytest.mark.parametrize("with_certificate", [False, True], ids=["password", "and-certificate"])
async def test_a_client_trusting_the_ca_gets_in(
    rabbitmq_url: str, tls_files: TlsFiles, with_certificate: bool
) -> None:
    url = _with_client_certificate(rabbitmq_url, tls_files) if with_certificate else rabbitmq_url
    client = await _connect(url)
    try:
        assert not client.connection.is_closed
    finally:
        await client.close()


async def test_a_server_certificate_from_another_ca_is_refused(
    rabbitmq_url: str, foreign_tls_files: TlsFiles
) -> None:
    refused = await _refusal(_with_ca(rabbitmq_url, str(foreign_tls_files.ca)))
    reason = describe_tls_failure(refused)
    assert reason is not None
    assert reason.startswith("the server's certificate is not trusted")


async def test_a_client_certificate_from_another_ca_is_refused(
    rabbitmq_url: str, foreign_tls_files: TlsFiles
) -> None:
    refused = await _refusal(_with_client_certificate(rabbitmq_url, foreign_tls_files))
    # Under TLS 1.3 the server checks the certificate after the client's side of the
    # handshake is done: its alert may be read, or lost to the reset that follows it.
    assert describe_tls_failure(refused) == CLIENT_REFUSED or "reset" in str(refused)


async def test_a_wrong_password_is_refused_over_tls(rabbitmq_url: str) -> None:
    wrong = str(yarl.URL(rabbitmq_url).with_password("not-the-password"))
    with pytest.raises(aiormq.exceptions.ProbableAuthenticationError):
        await _connect(wrong)


async def test_a_plain_connection_is_refused(rabbitmq_url: str) -> None:
    plain = str(yarl.URL(rabbitmq_url).with_scheme("amqp").with_query(None))
    refused = await _refusal(plain)
    assert describe_tls_failure(refused) is None  # the broker just drops it


async def test_a_service_stops_waiting_at_a_certificate_it_cannot_trust(
    rabbitmq_url: str, foreign_tls_files: TlsFiles
) -> None:
    """A service would otherwise wait for RabbitMQ forever, logging only a type name."""
    wrong_ca = _with_ca(rabbitmq_url, str(foreign_tls_files.ca))
    with pytest.raises(TlsHandshakeError, match="TLS with RabbitMQ failed: the server's"):
        await wait_for_dependency(
            lambda: _connect(wrong_ca),
            "RabbitMQ",
            asyncio.Event(),
            retry_on=(ConnectionError,),
        )


def _keeper(url: str) -> tuple[int, str]:
    result = CliRunner().invoke(
        app, ["--amqp-url", url, "vm", "list"], env={"KEEPER_AMQP_URLS": ""}
    )
    return result.exit_code, result.stderr


async def test_the_cli_says_the_certificate_was_not_trusted(
    rabbitmq_url: str, foreign_tls_files: TlsFiles
) -> None:
    code, said = await asyncio.to_thread(_keeper, _with_ca(rabbitmq_url, str(foreign_tls_files.ca)))
    assert code == ExitCode.DENIED, said
    assert "TLS with RabbitMQ at 127.0.0.1:" in said
    assert "the server's certificate is not trusted" in said
    assert f":{yarl.URL(rabbitmq_url).password}@" not in said


async def test_the_cli_says_a_client_certificate_was_refused(
    rabbitmq_url: str, foreign_tls_files: TlsFiles
) -> None:
    code, said = await asyncio.to_thread(
        _keeper, _with_client_certificate(rabbitmq_url, foreign_tls_files)
    )
    # The alert, or the bare reset TLS 1.3 may leave instead (see above) with its hint.
    if code == ExitCode.DENIED:
        assert CLIENT_REFUSED in said
    else:
        assert code == ExitCode.UNREACHABLE, said
        assert "if it refused the client certificate, check certfile=" in said


async def test_the_cli_hints_at_tls_when_a_plain_connection_is_dropped(
    rabbitmq_url: str,
) -> None:
    plain = str(yarl.URL(rabbitmq_url).with_scheme("amqp").with_query(None))
    code, said = await asyncio.to_thread(_keeper, plain)
    assert code == ExitCode.UNREACHABLE, said
    assert "if it takes TLS only, use amqps://" in said
    assert NOT_TLS not in said
