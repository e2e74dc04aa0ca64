"""Telling a failed TLS handshake apart from a server out of reach, in one line a person can
act on. aiormq and redis-py both wrap the ``ssl`` module's error (an object, or only its
text) in their own connection errors, so the reason is read from the error chain's text:
OpenSSL names it in brackets, ``[SSL: CERTIFICATE_VERIFY_FAILED]``."""

from __future__ import annotations

import re

_OPENSSL_REASON = re.compile(r"\[SSL: ([A-Z0-9_]+)\]")
_VERIFY_DETAIL = re.compile(r"certificate verify failed: (.+?)\.? \(_ssl")

SERVER_NOT_TRUSTED = (
    "the server's certificate is not trusted ({detail}): give the client the CA that "
    "signed it (cafile= in an AMQP URL, ssl_ca_certs= in a Redis URL) and connect to a name "
    "the certificate holds"
)
CLIENT_REFUSED = (
    "the server refused the client certificate (not signed by a CA it trusts, or expired): "
    "check certfile= and keyfile= (AMQP) or ssl_certfile= and ssl_keyfile= (Redis)"
)
NOT_TLS = (
    "the server does not speak TLS on this port: use its TLS port, or a plain URL "
    "(amqp://, redis://) if it really has no TLS"
)

_VERIFY_FAILED = "CERTIFICATE_VERIFY_FAILED"
_CLIENT_CERTIFICATE_ALERTS = frozenset(
    {
        "TLSV1_ALERT_UNKNOWN_CA",
        "SSLV3_ALERT_BAD_CERTIFICATE",
        "SSLV3_ALERT_CERTIFICATE_UNKNOWN",
        "SSLV3_ALERT_CERTIFICATE_EXPIRED",
        "TLSV13_ALERT_CERTIFICATE_REQUIRED",
        "TLSV1_ALERT_ACCESS_DENIED",
        "TLSV1_ALERT_DECRYPT_ERROR",
    }
)
_NOT_TLS_REASONS = frozenset(
    {"WRONG_VERSION_NUMBER", "PACKET_LENGTH_TOO_LONG", "RECORD_LAYER_FAILURE"}
)


def _texts(error: BaseException) -> list[str]:
    """The text of ``error``, of the errors it carries as arguments and of its causes."""
    texts: list[str] = []
    pending: list[BaseException] = [error]
    seen: set[int] = set()
    while pending:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        texts.append(str(current))
        pending += [part for part in current.args if isinstance(part, BaseException)]
        pending += [link for link in (current.__cause__, current.__context__) if link]
    return texts


def _openssl_reason(error: BaseException) -> tuple[str, str] | None:
    """OpenSSL's reason for the failure behind ``error`` and the text it was read from."""
    text = " ".join(_texts(error))
    found = _OPENSSL_REASON.search(text)
    return None if found is None else (found.group(1), text)


def describe_tls_failure(error: BaseException) -> str | None:
    """Why the TLS handshake behind ``error`` failed, for a person (never a secret: only
    OpenSSL's reason and the certificate check's own words); None when ``error`` is not a
    TLS failure."""
    found = _openssl_reason(error)
    if found is None:
        return None
    reason, text = found
    if reason == _VERIFY_FAILED:
        detail = _VERIFY_DETAIL.search(text)
        return SERVER_NOT_TRUSTED.format(
            detail=detail.group(1).strip() if detail else "verification failed"
        )
    if reason in _CLIENT_CERTIFICATE_ALERTS:
        return CLIENT_REFUSED
    if reason in _NOT_TLS_REASONS:
        return NOT_TLS
    return f"the TLS handshake failed (OpenSSL: {reason})"


def certificate_refused(error: BaseException) -> str | None:
    """`describe_tls_failure` when one side refused the other's certificate (no retry
    cures that); None for anything else, a handshake cut short by a server going down
    included, which is worth waiting out."""
    found = _openssl_reason(error)
    if found is None or (found[0] != _VERIFY_FAILED and found[0] not in _CLIENT_CERTIFICATE_ALERTS):
        return None
    return describe_tls_failure(error)


class TlsHandshakeError(Exception):
    """A connection failed in its TLS handshake; waiting does not cure it (a wrong CA or
    client certificate), so a service stops with this instead of retrying."""
