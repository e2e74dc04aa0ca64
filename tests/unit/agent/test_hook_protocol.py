"""The hook socket's protocol: one versioned JSON line each way, anything else refused with
a reason the hook can show."""

from __future__ import annotations

import json

import pytest

from keeper_host_agent.hook.protocol import (
    PROTOCOL_VERSION,
    HookPhase,
    HookProtocolError,
    HookReply,
    encode_reply,
    parse_request,
)


def line(**fields: object) -> bytes:
    return json.dumps(fields).encode() + b"\n"


def test_a_request_line_is_parsed() -> None:
    request = parse_request(line(v=1, phase="prepare", name="vm1", xml="<domain/>"))
    assert request.phase is HookPhase.PREPARE
    assert (request.name, request.xml) == ("vm1", "<domain/>")


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"not json\n", "not a JSON line"),
        (b"[1, 2]\n", "not a JSON object"),
        (line(v=2, phase="prepare", name="vm1", xml=""), "protocol version 2 not spoken"),
        (line(phase="prepare", name="vm1", xml=""), "protocol version None"),
        (line(v=1, phase="shutdown", name="vm1", xml=""), "not a valid request"),
        (line(v=1, phase="prepare", xml=""), "not a valid request"),
    ],
)
def test_anything_else_is_refused_with_a_reason(raw: bytes, reason: str) -> None:
    with pytest.raises(HookProtocolError, match=reason):
        parse_request(raw)


def test_a_reply_is_one_json_line_with_the_version() -> None:
    encoded = encode_reply(HookReply(ok=False, message="refused: why"))
    assert encoded.endswith(b"\n")
    assert encoded.count(b"\n") == 1
    assert json.loads(encoded) == {"v": PROTOCOL_VERSION, "ok": False, "message": "refused: why"}
