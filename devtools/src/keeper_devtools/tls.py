"""A throwaway certificate authority for the local stack and the tests: one CA, a server
certificate for this machine's loopback names, and a client certificate, short-lived.

``python -m keeper_devtools.tls make DIR [--name NAME]…`` writes into ``DIR``:

- ``ca.pem``: the CA certificate every client and server trusts (public).
- ``server.pem`` / ``server.key``: RabbitMQ's and Redis's certificate, for ``localhost``,
  ``127.0.0.1``, ``::1`` and every ``--name``.
- ``client.pem`` / ``client.key``: a client certificate (optional for every server).

Keys are ECDSA P-256 (cheap to make: a test session makes one CA in milliseconds), written
0600; the CA's own key is never written, so nothing can issue another certificate under it
later: to add one, make a new set. Production uses the operator's own CA instead (see
docs/deploy-many-machines.md); nothing here is meant for it.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_VALID_FOR = datetime.timedelta(days=30)
LEAF_VALID_FOR = datetime.timedelta(days=7)
RENEW_BEFORE = datetime.timedelta(days=1)
"""A set whose server certificate expires within this is made again (`ensure_tls_files`)."""
SERVER_NAMES = ("localhost",)
SERVER_ADDRESSES = ("127.0.0.1", "::1")
CLIENT_NAME = "keeper-client"


@dataclass(frozen=True)
class TlsFiles:
    """Where one set of certificates lives (see the module docstring for each file)."""

    directory: Path

    @property
    def ca(self) -> Path:
        """The CA certificate (PEM) clients and servers verify the other side with."""
        return self.directory / "ca.pem"

    @property
    def server_cert(self) -> Path:
        """The servers' certificate (PEM)."""
        return self.directory / "server.pem"

    @property
    def server_key(self) -> Path:
        """The servers' private key (PEM, 0600)."""
        return self.directory / "server.key"

    @property
    def client_cert(self) -> Path:
        """A client certificate (PEM) signed by the CA."""
        return self.directory / "client.pem"

    @property
    def client_key(self) -> Path:
        """The client certificate's private key (PEM, 0600)."""
        return self.directory / "client.key"


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "vTPM Keeper throwaway CA"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _issue(
    *,
    subject: x509.Name,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Name,
    issuer_key: ec.EllipticCurvePrivateKey,
    valid_for: datetime.timedelta,
    now: datetime.datetime,
    extensions: Sequence[tuple[x509.ExtensionType, bool]],
) -> x509.Certificate:
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        # A minute back: a server whose clock is a little behind still accepts it.
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + valid_for)
    )
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    return builder.sign(issuer_key, hashes.SHA256())


def _leaf_extensions(
    usages: list[x509.ObjectIdentifier], names: x509.SubjectAlternativeName | None
) -> list[tuple[x509.ExtensionType, bool]]:
    extensions: list[tuple[x509.ExtensionType, bool]] = [
        (x509.BasicConstraints(ca=False, path_length=None), True),
        (x509.ExtendedKeyUsage(usages), False),
        (
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            True,
        ),
    ]
    if names is not None:
        extensions.append((names, False))
    return extensions


def _write(path: Path, data: bytes, mode: int) -> None:
    """Write ``path`` created with ``mode`` from the start (a key is never readable by
    others, not even for a moment), replacing an older file."""
    temporary = path.with_name(path.name + ".new")
    temporary.unlink(missing_ok=True)
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    temporary.replace(path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def make_tls_files(
    directory: Path, *, ca_name: str = "keeper-local-ca", server_names: Sequence[str] = ()
) -> TlsFiles:
    """Make a new CA and its server and client certificates in ``directory`` (created
    0700 if missing); files of an older set are replaced. The server certificate holds the
    loopback names and ``server_names`` (DNS names the servers are dialled by, such as a
    compose file's service names)."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    files = TlsFiles(directory)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_subject = _name(ca_name)
    ca_cert = _issue(
        subject=ca_subject,
        key=ca_key,
        issuer=ca_subject,
        issuer_key=ca_key,
        valid_for=CA_VALID_FOR,
        now=now,
        extensions=[
            (x509.BasicConstraints(ca=True, path_length=0), True),
            (
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                True,
            ),
            (x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False),
        ],
    )
    server_san = x509.SubjectAlternativeName(
        [
            *(x509.DNSName(name) for name in (*SERVER_NAMES, *server_names)),
            *(x509.IPAddress(ipaddress.ip_address(address)) for address in SERVER_ADDRESSES),
        ]
    )
    # The servers' certificate is a client one too: a Redis replica or Sentinel presents
    # it when it connects to a primary (tls-replication).
    server_usages = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    leaves = [
        (files.server_cert, files.server_key, SERVER_NAMES[0], server_usages, server_san),
        (files.client_cert, files.client_key, CLIENT_NAME, [ExtendedKeyUsageOID.CLIENT_AUTH], None),
    ]
    for cert_path, key_path, common_name, usages, names in leaves:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _issue(
            subject=_name(common_name),
            key=key,
            issuer=ca_subject,
            issuer_key=ca_key,
            valid_for=LEAF_VALID_FOR,
            now=now,
            extensions=[
                *_leaf_extensions(usages, names),
                (
                    x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                    False,
                ),
            ],
        )
        _write(key_path, _key_pem(key), 0o600)
        _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    # The CA certificate last: a set with a CA file is complete.
    _write(files.ca, ca_cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return files


def ensure_tls_files(directory: Path) -> TlsFiles:
    """The set in ``directory``, made anew when it is missing, incomplete or its server
    certificate expires within `RENEW_BEFORE` (the local stack calls this on every start)."""
    files = TlsFiles(directory)
    paths = (files.ca, files.server_cert, files.server_key, files.client_cert, files.client_key)
    if all(path.is_file() for path in paths):
        server = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
        if server.not_valid_after_utc - RENEW_BEFORE > datetime.datetime.now(datetime.UTC):
            return files
    return make_tls_files(directory)


def main(argv: Sequence[str] | None = None) -> int:
    """``make DIR``: a new set in DIR; print where the files are."""
    parser = argparse.ArgumentParser(
        prog="python -m keeper_devtools.tls",
        description="Make a throwaway CA with a server and a client certificate.",
    )
    parser.add_argument("command", choices=["make"])
    parser.add_argument("directory", type=Path)
    parser.add_argument(
        "--name",
        action="append",
        default=[],
        help="another DNS name for the server certificate (repeatable)",
    )
    parsed = parser.parse_args(argv)
    files = make_tls_files(parsed.directory, server_names=parsed.name)
    for label, path in (
        ("CA", files.ca),
        ("server certificate", files.server_cert),
        ("server key", files.server_key),
        ("client certificate", files.client_cert),
        ("client key", files.client_key),
    ):
        print(f"{label:<19} {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
