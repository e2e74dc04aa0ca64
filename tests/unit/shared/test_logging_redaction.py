"""Logging with redaction (invariant 4): a planted canary must never reach rendered output."""

from __future__ import annotations

import base64
import json
import logging
import secrets
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import structlog
from pydantic import SecretBytes, SecretStr
from structlog.testing import capture_logs
from structlog.typing import EventDict

from keeper_shared.messages.types import TpmSecret
from keeper_shared.messages.vm import PrepareVm
from keeper_shared.runtime.logging import configure_logging, redact_secrets
from keeper_shared.sealing.state_blobs import seal_tpm_secret
from keeper_state_store.crypto.tpm_secrets import new_secret_value
from support.leak_scan import find_leaks, leak_forms
from support.sealing_keys import new_keys

VM_ID = "5b0e8d1e-3c55-4d8f-9a51-0c6f6f8e2a11"
SECRET_UUID = "0c6a4b7e-54a4-4bb5-a0d2-6e3b3f1e2d11"
HASH = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
WINDOW = 16


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """Undo configure_logging so tests do not leak handlers, hooks or context."""
    root = logging.getLogger()
    level, hook = root.level, sys.excepthook
    yield
    for handler in [h for h in root.handlers if h.get_name() == "keeper_shared.runtime.logging"]:
        root.removeHandler(handler)
    root.setLevel(level)
    sys.excepthook = hook
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()


@pytest.fixture
def canary() -> bytes:
    """A key-sized secret."""
    return secrets.token_bytes(32)


@pytest.fixture
def canary_blob() -> bytes:
    """A TPM-state-sized secret, whose hex and base64 are long."""
    return secrets.token_bytes(4096)


def assert_no_leak(output: str, secret: bytes) -> None:
    """No form of ``secret`` and no 16-char piece of its hex or base64 is in ``output``."""
    escaped = repr(secret)[2:-1]
    for form in (
        secret.hex(),
        secret.hex().upper(),
        base64.b64encode(secret).decode(),
        base64.urlsafe_b64encode(secret).decode(),
        escaped,
        json.dumps(escaped)[1:-1],
        secret.decode("latin-1"),
    ):
        assert form not in output
    lowered = output.lower()
    hex_form = secret.hex()
    for start in range(len(hex_form) - WINDOW + 1):
        assert hex_form[start : start + WINDOW] not in lowered
    for encoded in (base64.b64encode(secret).decode(), base64.urlsafe_b64encode(secret).decode()):
        for start in range(len(encoded) - WINDOW + 1):
            assert encoded[start : start + WINDOW] not in output


def json_lines(output: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in output.splitlines() if line.strip()]


def redact(**fields: object) -> EventDict:
    return redact_secrets(None, "info", {"event": "test", **fields})


# --- the processor on its own ---------------------------------------------------------


@pytest.mark.parametrize(
    "wrap",
    [bytes, bytearray, memoryview, SecretBytes],
    ids=["bytes", "bytearray", "memoryview", "SecretBytes"],
)
def test_byte_values_are_replaced_by_their_size(canary: bytes, wrap: Any) -> None:
    assert redact(thing=wrap(canary))["thing"] == "<redacted 32 bytes>"


def test_secret_str_is_replaced_without_its_length() -> None:
    assert redact(thing=SecretStr("hunter2"))["thing"] == "<redacted>"


@pytest.mark.parametrize(
    "name",
    [
        "password",
        "db_passphrase",
        "client_secret",
        "api_token",
        "key",
        "private_key",
        "kek",
        "dek",
        "nvram_blob",
        "data",
        "Content",
        "payload",
        "body",
        "credentials",
    ],
)
def test_secret_named_fields_are_replaced(name: str) -> None:
    assert redact(**{name: "hunter2"})[name] == "<redacted 7 chars>"
    assert redact(**{name: {"nested": "x"}})[name] == "<redacted>"


def test_numbers_and_none_under_secret_names_stay() -> None:
    event = redact(blob_size=540672, data=None, payload_ok=True, content_ratio=0.5)
    assert event["blob_size"] == 540672
    assert event["data"] is None
    assert event["payload_ok"] is True
    assert event["content_ratio"] == 0.5


def test_ids_hashes_routing_keys_and_fencing_tokens_stay() -> None:
    fields: dict[str, object] = {
        "key_id": "abcd1234",
        "kek_id": "abcd1234",
        "routing_key": "host.hv01.state.changed",
        "content_hash": HASH,
        "sha256": HASH,
        "fencing_token": {"epoch": 3, "generation": 7},
        "vm_id": VM_ID,
        "path": "/var/lib/libvirt/swtpm/5b0e8d1e-3c55-4d8f-9a51-0c6f6f8e2a11/tpm2/tpm2-00.permall",
    }
    assert redact(**fields) == {"event": "test", **fields}


def test_hash_sized_hex_stays_and_longer_hex_goes() -> None:
    assert redact(value=HASH)["value"] == HASH
    assert redact(value=HASH + "0")["value"] == "<redacted 65 chars>"
    assert redact(value=f"expected {HASH} got {HASH}")["value"] == f"expected {HASH} got {HASH}"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (
            "redis://keeper-store:s3cret-pw@redis-1:6379/0",
            "redis://keeper-store:<redacted>@redis-1:6379/0",
        ),
        ("rediss://:s3cret-pw@redis-1/0", "rediss://:<redacted>@redis-1/0"),
        ("amqp://keeper:s3cret-pw@rabbit-1:5672/", "amqp://keeper:<redacted>@rabbit-1:5672/"),
        ("redis://redis-1:6379/0", "redis://redis-1:6379/0"),
    ],
)
def test_a_password_in_a_url_is_replaced(url: str, shown: str) -> None:
    # In a neutral field and in an exception's text alike: the Redis URL comes from the
    # settings and may carry the service's password.
    assert redact(url=url)["url"] == shown
    assert redact(event=f"cannot reach {url}: refused")["event"] == f"cannot reach {shown}: refused"


def test_encoded_blobs_in_neutral_fields_and_text_are_replaced(
    canary: bytes, canary_blob: bytes
) -> None:
    encoded = {
        "key_b64": base64.b64encode(canary).decode(),
        "key_b64url": base64.urlsafe_b64encode(canary).decode(),
        "blob_hex": canary_blob.hex(),
        "blob_b64": base64.b64encode(canary_blob).decode(),
    }
    for form in encoded.values():
        event = redact(value=form, message=f"received {form}, storing")
        rendered = json.dumps(event)
        assert_no_leak(rendered, canary)
        assert_no_leak(rendered, canary_blob)
        assert event["message"].startswith("received <redacted ")


def test_long_paths_and_identifiers_stay_readable() -> None:
    paths = [
        "/srv/keeper/exports/" + "abcdefghijklmnopqrstuvwxyz/" * 4 + "bundle",
        "/var/lib/libvirt/qemu/nvram/Production-Win2022-Datacenter-SQL01_VARS.fd",
    ]
    for path in paths:
        assert redact(value=path)["value"] == path
        assert redact(value=f"wrote {path}")["value"] == f"wrote {path}"
    assert redact(value="x" * 100)["value"] == "x" * 100


def test_bytes_reprs_inside_text_are_replaced(canary: bytes) -> None:
    @dataclass
    class Frame:
        channel: int
        raw: bytes

    event = redact(
        event=f"unexpected frame {canary!r}",
        frame=Frame(channel=1, raw=canary),
        error=ValueError(canary),
        truncated=repr(canary)[:40],
    )

    assert event["event"] == "unexpected frame <redacted 32 bytes>"
    assert event["frame"].startswith("test_bytes_reprs_inside_text_are_replaced.<locals>.Frame(")
    assert "channel=1" in event["frame"]
    assert_no_leak(json.dumps(event), canary)


def test_nested_structures_are_walked_without_mutating_the_input(canary: bytes) -> None:
    inventory: dict[str, Any] = {
        "vm": {"nvram": canary, "names": ["a", canary], "pair": (SecretBytes(canary), 1)},
        "hosts": {"hv01": {"tpm_data": "visible?"}},
    }

    event = redact(inventory=inventory)

    assert event["inventory"] == {
        "vm": {
            "nvram": "<redacted 32 bytes>",
            "names": ["a", "<redacted 32 bytes>"],
            "pair": ("<redacted 32 bytes>", 1),
        },
        "hosts": {"hv01": {"tpm_data": "<redacted 8 chars>"}},
    }
    assert inventory["vm"]["nvram"] == canary


def test_processor_in_a_structlog_chain(canary: bytes) -> None:
    with capture_logs(processors=[redact_secrets]) as logs:
        structlog.get_logger().info("blob_received", vm_id=VM_ID, blob=canary, size=32)

    assert logs == [
        {
            "event": "blob_received",
            "vm_id": VM_ID,
            "blob": "<redacted 32 bytes>",
            "size": 32,
            "log_level": "info",
        }
    ]


# --- the configured pipeline, as rendered ----------------------------------------------


def test_json_output_never_contains_the_canary(
    capsys: pytest.CaptureFixture[str], canary: bytes, canary_blob: bytes
) -> None:
    configure_logging("state-store", json_output=True)
    log = structlog.get_logger("keeper.test")

    log.info("as_bytes", nvram=canary, frame=canary)
    log.info("as_secret_bytes", anything=SecretBytes(canary))
    log.info("nested", inventory={"vms": [{"vm_id": VM_ID, "state": {"raw": canary}}]})
    log.info("as_hex", key=canary.hex(), blob=canary_blob.hex(), neutral=canary_blob.hex())
    log.info("as_base64", passphrase=base64.b64encode(canary).decode())
    log.info("as_base64_neutral", a=base64.b64encode(canary).decode())
    log.info("as_base64_blob", a=base64.b64encode(canary_blob).decode())
    log.info(f"in the message {canary!r} {canary_blob.hex()}")
    log.info("hash_visible", content_hash=HASH, vm_id=VM_ID)

    output = capsys.readouterr().err
    lines = json_lines(output)
    assert len(lines) == 9
    assert all(line["service"] == "state-store" for line in lines)
    assert lines[-1]["content_hash"] == HASH
    assert_no_leak(output, canary)
    assert_no_leak(output, canary_blob)


def test_a_tpm_secret_in_a_prepare_never_renders(capsys: pytest.CaptureFixture[str]) -> None:
    """The libvirt secret swtpm encrypts the TPM with, as the store makes them (a printable
    passphrase, short enough to slip past the long-hex/base64 patterns): only the models'
    masking keeps it out, wherever it is logged."""
    value = new_secret_value()
    secret = TpmSecret(uuid=SECRET_UUID, value=SecretBytes(value))
    sealed = seal_tpm_secret(VM_ID, secret, new_keys().public, command_epoch=3)
    prepare = PrepareVm(vm_id=VM_ID, name="win11", epoch=3, tpm_secret=sealed)
    configure_logging("host-agent", json_output=True)
    log = structlog.get_logger("keeper.test")

    log.info("prepare", request=prepare, neutral=secret)
    log.info("secret", tpm_secret=secret.value, tpm_secret_id=secret.uuid)
    log.info(f"in the message {prepare!r} {secret}")
    try:
        raise ValueError(f"cannot define {secret.value}")
    except ValueError:
        log.exception("failed", vm_id=VM_ID)

    output = capsys.readouterr().err
    assert len(json_lines(output)) == 4
    assert SECRET_UUID in output  # a name operators need, not a secret
    assert find_leaks([("log", output.encode())], leak_forms(value)) == []


def fail_to_store(canary: bytes, canary_blob: bytes) -> None:
    # A local that only a locals-showing traceback could leak: 64 hex chars look like a
    # hash, so redaction alone would let it through.
    material_hex = canary.hex()
    raise ValueError(
        f"cannot store {canary!r} ({len(material_hex)} hex chars), "
        f"b64 {base64.b64encode(canary).decode()}, blob {canary_blob.hex()}"
    )


@pytest.mark.parametrize("json_output", [True, False], ids=["json", "console"])
def test_logged_exception_is_redacted_and_shows_no_locals(
    capsys: pytest.CaptureFixture[str], canary: bytes, canary_blob: bytes, json_output: bool
) -> None:
    configure_logging("state-store", json_output=json_output)
    log = structlog.get_logger("keeper.test")

    try:
        fail_to_store(canary, canary_blob)
    except ValueError:
        log.exception("store_failed", vm_id=VM_ID)

    output = capsys.readouterr().err
    assert "store_failed" in output
    assert "ValueError" in output
    assert "fail_to_store" in output
    assert_no_leak(output, canary)
    assert_no_leak(output, canary_blob)
    if json_output:
        (line,) = json_lines(output)
        frames = [frame for stack in line["exception"] for frame in stack["frames"]]
        assert frames
        assert all("locals" not in frame for frame in frames)


def test_stdlib_library_logs_use_the_same_pipeline(
    capsys: pytest.CaptureFixture[str], canary: bytes
) -> None:
    configure_logging("host-agent", json_output=True)
    structlog.contextvars.bind_contextvars(vm_id=VM_ID)

    logging.getLogger("aiormq").warning("connection lost while sending %r", canary)
    try:
        raise ConnectionError(f"frame {canary!r}")
    except ConnectionError:
        logging.getLogger("redis").exception("command failed")

    warning, error = json_lines(capsys.readouterr().err)
    assert warning["logger"] == "aiormq"
    assert warning["level"] == "warning"
    assert warning["service"] == "host-agent"
    assert warning["vm_id"] == VM_ID
    assert warning["timestamp"].endswith("Z")
    assert warning["event"] == "connection lost while sending <redacted 32 bytes>"
    assert error["logger"] == "redis"
    assert error["exception"][0]["exc_type"] == "ConnectionError"
    assert error["exception"][0]["exc_value"] == "frame <redacted 32 bytes>"
    assert_no_leak(json.dumps([warning, error]), canary)


def test_uncaught_exception_goes_through_redaction(
    capsys: pytest.CaptureFixture[str], canary: bytes
) -> None:
    configure_logging("policy", json_output=True)

    try:
        raise RuntimeError(f"crashed holding {canary!r}")
    except RuntimeError as exc:
        sys.excepthook(RuntimeError, exc, exc.__traceback__)

    output = capsys.readouterr().err
    (line,) = json_lines(output)
    assert line["level"] == "critical"
    assert line["event"] == "uncaught_exception"
    assert_no_leak(output, canary)


def test_json_is_the_default_when_stderr_is_not_a_terminal(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure_logging("policy")
    structlog.get_logger().info("started")

    (line,) = json_lines(capsys.readouterr().err)
    assert line["event"] == "started"


def test_reconfiguring_does_not_duplicate_lines(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("policy", json_output=True)
    configure_logging("policy", json_output=True)
    structlog.get_logger().info("once")

    assert len(json_lines(capsys.readouterr().err)) == 1


def test_level_filters_and_unknown_levels_are_refused(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure_logging("policy", json_output=True, level="warning")
    structlog.get_logger().info("hidden")
    logging.getLogger("aio_pika").info("hidden too")
    structlog.get_logger().warning("shown")

    assert [line["event"] for line in json_lines(capsys.readouterr().err)] == ["shown"]
    with pytest.raises(ValueError, match="unknown log level"):
        configure_logging("policy", level="LOUD")


async def test_other_stdlib_handlers_only_see_redacted_structlog_events(
    caplog: pytest.LogCaptureFixture, canary: bytes
) -> None:
    configure_logging("state-store", json_output=True)
    log = structlog.get_logger()

    try:
        raise ValueError(f"bad blob {canary!r}")
    except ValueError:
        log.exception("store_failed", blob=canary)
        await log.aexception("store_failed_async", blob=canary)

    assert [record.levelname for record in caplog.records] == ["ERROR", "ERROR"]
    for record in caplog.records:
        assert record.exc_info is None
        assert "bad blob <redacted 32 bytes>" in str(record.msg)
    assert_no_leak(caplog.text, canary)
