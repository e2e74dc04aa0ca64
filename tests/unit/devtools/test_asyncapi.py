"""The committed AsyncAPI document is what the models generate, and old messages are read."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

import pytest

from keeper_devtools.contract import (
    MessageRole,
    build_document,
    discover_payloads,
    message_id,
    render,
    role_of,
)
from keeper_devtools.contract.__main__ import main as contract_main
from keeper_shared.messages.envelope import (
    MessageError,
    Payload,
    decode,
    register_upcaster,
    unregister_upcaster,
)
from keeper_shared.messages.state import StateChanged

COMMITTED = Path(__file__).resolve().parents[3] / "docs" / "asyncapi.json"


def test_committed_document_matches_the_models() -> None:
    assert COMMITTED.exists(), (
        "docs/asyncapi.json is missing: run `python -m keeper_devtools.contract`"
    )
    committed = COMMITTED.read_text(encoding="utf-8")
    assert committed == render(), (
        "docs/asyncapi.json differs from the message models: "
        "run `.venv/bin/python -m keeper_devtools.contract` and commit the result"
    )


def test_check_mode_reports_a_stale_file(tmp_path: Path) -> None:
    stale = tmp_path / "asyncapi.json"
    stale.write_text("{}\n", encoding="utf-8")
    assert contract_main(["--check", "--output", str(stale)]) == 1
    assert contract_main(["--output", str(stale)]) == 0
    assert contract_main(["--check", "--output", str(stale)]) == 0


def test_every_payload_is_a_message_of_the_document() -> None:
    document = build_document()
    payloads = discover_payloads()
    assert StateChanged in payloads
    assert document["asyncapi"] == "3.0.0"
    names = {message["name"] for message in document["components"]["messages"].values()}
    assert names == {cls.message_type for cls in payloads}
    for cls in payloads:
        # The key is the message's id in AsyncAPI 3.0 (which has no `messageId` field).
        message = document["components"]["messages"][message_id(cls)]
        assert message_id(cls) == cls.__name__
        assert message["name"] == cls.message_type
        assert message["x-schema-version"] == cls.schema_version
        assert message["payload"]["properties"]["type"]["const"] == cls.message_type
        assert message["payload"]["properties"]["schema_version"]["const"] == cls.schema_version
        if role_of(cls) is MessageRole.EVENT:
            channel = document["channels"][f"events.{cls.message_type}"]
            assert channel["address"] == f"{cls.message_type}.{{origin}}"
            assert document["operations"][f"events.{cls.message_type}"]["action"] == "send"


def test_every_reference_resolves() -> None:
    document = build_document()

    def refs(node: Any) -> Iterator[str]:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "$ref" and isinstance(value, str):
                    yield value
                else:
                    yield from refs(value)
        elif isinstance(node, list):
            for item in node:
                yield from refs(item)

    for ref in refs(document):
        assert ref.startswith("#/"), ref
        target: Any = document
        for part in ref[2:].split("/"):
            assert part in target, f"unresolved {ref}"
            target = target[part]


def test_secret_fields_are_marked_in_the_schema() -> None:
    text = json.dumps(build_document())
    assert '"writeOnly": true' in text  # pydantic marks SecretBytes / SecretStr


class _Greeting(Payload):
    """A message at its second version: ``name`` became ``full_name`` and ``polite`` was
    added."""

    message_type: ClassVar[str] = "test.greeting"
    schema_version: ClassVar[int] = 3

    full_name: str
    polite: bool


def _body(version: int, data: dict[str, Any]) -> bytes:
    return json.dumps(
        {
            "id": str(uuid.uuid4()),
            "type": "test.greeting",
            "source": "test",
            "time": datetime.now(UTC).isoformat(),
            "subject": "x",
            "schema_version": version,
            "data": data,
        }
    ).encode()


@pytest.fixture
def upcasters() -> Iterator[None]:
    @register_upcaster("test.greeting", 1)
    def v1_to_v2(data: dict[str, Any]) -> dict[str, Any]:
        data["full_name"] = data.pop("name")
        return data

    @register_upcaster("test.greeting", 2)
    def v2_to_v3(data: dict[str, Any]) -> dict[str, Any]:
        data.setdefault("polite", True)
        return data

    yield
    unregister_upcaster("test.greeting", 1)
    unregister_upcaster("test.greeting", 2)


@pytest.mark.usefixtures("upcasters")
def test_an_old_version_is_upcast_step_by_step() -> None:
    envelope = decode(_body(1, {"name": "Ada"}), _Greeting)
    assert envelope.data == _Greeting(full_name="Ada", polite=True)
    assert envelope.schema_version == 3
    assert decode(_body(2, {"full_name": "Ada", "polite": False}), _Greeting).data.polite is False
    assert decode(_body(3, {"full_name": "Ada", "polite": False}), _Greeting).data.polite is False


@pytest.mark.usefixtures("upcasters")
def test_a_newer_version_is_still_refused() -> None:
    with pytest.raises(MessageError, match="not supported"):
        decode(_body(4, {"full_name": "Ada", "polite": True}), _Greeting)


def test_a_missing_upcaster_is_a_clear_error() -> None:
    with pytest.raises(MessageError, match="no upcaster from v1"):
        decode(_body(1, {"name": "Ada"}), _Greeting)


def test_a_failing_upcaster_does_not_leak_the_input() -> None:
    secret = "canary-3b1f9e"

    @register_upcaster("test.greeting", 1)
    def broken(data: dict[str, Any]) -> dict[str, Any]:
        raise KeyError(data["name"])

    try:
        with pytest.raises(MessageError) as caught:
            decode(_body(1, {"name": secret}), _Greeting)
    finally:
        unregister_upcaster("test.greeting", 1)
    assert secret not in str(caught.value)
    assert caught.value.__context__ is None
    assert caught.value.__cause__ is None


_PAST_TENSE_IRREGULAR = {"heartbeat", "lost", "reset"}


def test_every_event_reads_as_a_fact() -> None:
    """Messages default to events; a new command must be named in the contract's table
    (keeper_devtools.contract.commands.COMMANDS) or it is documented on the wrong channel.
    Events are facts in the past tense, so an imperative classed as an event is caught."""
    for cls in discover_payloads():
        if role_of(cls) is not MessageRole.EVENT:
            continue
        last = cls.message_type.rsplit(".", 1)[-1]
        assert last.endswith("ed") or last in _PAST_TENSE_IRREGULAR, (
            f"{cls.message_type} looks like a command: add it to "
            "keeper_devtools.contract.commands.COMMANDS with its reply and follow-up events, "
            "then regenerate docs/asyncapi.json"
        )
