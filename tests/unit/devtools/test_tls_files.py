"""The throwaway CA: keys only for their owner, certificates that chain to the CA and name
the loopback addresses, made again only when incomplete or about to expire."""

from __future__ import annotations

import datetime
import ipaddress
import os
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from keeper_devtools import tls
from keeper_devtools.tls import ensure_tls_files, main, make_tls_files


def _certificate(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_keys_are_private_and_certificates_chain_to_the_ca(tmp_path: Path) -> None:
    files = make_tls_files(tmp_path / "tls")
    for key in (files.server_key, files.client_key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert not list((tmp_path / "tls").glob("*ca*.key"))  # the CA's key is never kept
    ca = _certificate(files.ca)
    for leaf in (files.server_cert, files.client_cert):
        _certificate(leaf).verify_directly_issued_by(ca)
    server = _certificate(files.server_cert)
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("127.0.0.1") in names.get_values_for_type(x509.IPAddress)
    assert "localhost" in names.get_values_for_type(x509.DNSName)
    usages = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    # A Redis replica or Sentinel presents the server certificate as a client.
    assert set(usages) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    lifetime = server.not_valid_after_utc - server.not_valid_before_utc
    assert lifetime <= datetime.timedelta(days=8)


def test_a_current_set_is_kept_and_an_incomplete_one_made_again(tmp_path: Path) -> None:
    files = ensure_tls_files(tmp_path)
    first = files.ca.read_bytes()
    assert ensure_tls_files(tmp_path).ca.read_bytes() == first
    files.server_key.unlink()  # an incomplete set is made again too
    assert ensure_tls_files(tmp_path).ca.read_bytes() != first


def test_the_command_makes_a_set(tmp_path: Path) -> None:
    assert main(["make", str(tmp_path / "made"), "--name", "redis-1", "--name", "redis-2"]) == 0
    server = _certificate(tmp_path / "made" / "server.pem")
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"localhost", "redis-1", "redis-2"} == set(names.get_values_for_type(x509.DNSName))
    assert sorted(os.listdir(tmp_path / "made")) == [
        "ca.pem",
        "client.key",
        "client.pem",
        "server.key",
        "server.pem",
    ]


def test_a_set_about_to_expire_is_made_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tls, "LEAF_VALID_FOR", datetime.timedelta(hours=12))
    short_lived = make_tls_files(tmp_path).ca.read_bytes()
    monkeypatch.undo()
    renewed = ensure_tls_files(tmp_path)
    assert renewed.ca.read_bytes() != short_lived
    lifetime = _certificate(renewed.server_cert).not_valid_after_utc
    assert lifetime > datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=6)
