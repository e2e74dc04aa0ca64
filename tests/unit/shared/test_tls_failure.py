"""A failed TLS handshake is told apart from a server out of reach, from the text aiormq
and redis-py wrap the ssl module's error in (their real messages, as seen against
RabbitMQ 3.10 and Redis 7.0)."""

from __future__ import annotations

import ssl

import aiormq.exceptions
import pytest
import redis.exceptions

from keeper_shared.runtime.tls_failure import (
    CLIENT_REFUSED,
    NOT_TLS,
    certificate_refused,
    describe_tls_failure,
)


def _wrapped(error: BaseException) -> aiormq.exceptions.AMQPConnectionError:
    """As aiormq raises it: the ssl error as an argument."""
    return aiormq.exceptions.AMQPConnectionError(error)


def test_a_server_certificate_the_client_cannot_verify() -> None:
    cause = ssl.SSLCertVerificationError(
        1,
        "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: self-signed "
        "certificate in certificate chain (_ssl.c:1006)",
    )
    reason = describe_tls_failure(_wrapped(cause))
    assert reason is not None
    assert reason.startswith(
        "the server's certificate is not trusted (self-signed certificate in certificate chain)"
    )
    assert "cafile=" in reason


@pytest.mark.parametrize(
    "error",
    [
        aiormq.exceptions.AMQPConnectionError(
            "Server communication error: SSLError(1, '[SSL: TLSV1_ALERT_UNKNOWN_CA] tlsv1 "
            "alert unknown ca (_ssl.c:2580)')"
        ),
        redis.exceptions.ConnectionError(
            "Error while reading from 127.0.0.1:6379 : (1, '[SSL: TLSV1_ALERT_UNKNOWN_CA] "
            "tlsv1 alert unknown ca (_ssl.c:2580)')"
        ),
    ],
    ids=["amqp", "redis"],
)
def test_a_client_certificate_the_server_refused(error: BaseException) -> None:
    assert describe_tls_failure(error) == CLIENT_REFUSED


def test_a_cause_further_down_the_chain_is_found() -> None:
    outer = ConnectionError("connect failed")
    outer.__cause__ = ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number")
    assert describe_tls_failure(outer) == NOT_TLS


def test_other_failures_are_not_tls_failures() -> None:
    assert describe_tls_failure(ConnectionRefusedError(111, "Connection refused")) is None
    reset = aiormq.exceptions.AMQPConnectionError(
        "Server connection reset: ConnectionResetError(104, 'Connection reset by peer')"
    )
    assert describe_tls_failure(reset) is None


def test_an_unknown_openssl_reason_is_named() -> None:
    error = ConnectionError("[SSL: NO_SHARED_CIPHER] no shared cipher")
    assert describe_tls_failure(error) == "the TLS handshake failed (OpenSSL: NO_SHARED_CIPHER)"


def test_only_a_refused_certificate_stops_a_service_from_waiting() -> None:
    """A broker going down mid-handshake is worth waiting out; a wrong CA is not."""
    cut_short = ConnectionError(
        "[SSL: UNEXPECTED_EOF_WHILE_READING] EOF occurred in violation of protocol"
    )
    assert describe_tls_failure(cut_short) is not None
    assert certificate_refused(cut_short) is None
    assert certificate_refused(ConnectionError("[SSL: WRONG_VERSION_NUMBER] x")) is None
    untrusted = ConnectionError(
        "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: unable to get local "
        "issuer certificate (_ssl.c:1006)"
    )
    assert (certificate_refused(untrusted) or "").startswith("the server's certificate")
    refused = ConnectionError("[SSL: TLSV1_ALERT_UNKNOWN_CA] tlsv1 alert unknown ca")
    assert certificate_refused(refused) == CLIENT_REFUSED
