"""Rolling upgrades without I/O: each release's manifest, downcasting, the sender's cap and
its refusal of what the receiver's release cannot read (docs/upgrades.md)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from pydantic import Field
from structlog.testing import capture_logs

from keeper_shared.bus.client import Delivery, ReceiverCannotReadError, Route
from keeper_shared.bus.topology import QueueSpec, host_command_key
from keeper_shared.bus.upgrade_levels import (
    RELEASE_HEADER,
    ReceiverLevels,
    configured_level,
    sender_release,
)
from keeper_shared.messages.envelope import (
    Envelope,
    NotExpressibleError,
    Payload,
    decode,
    encode,
    new_envelope,
    register_downcaster,
    register_upcaster,
    unregister_downcaster,
    unregister_upcaster,
)
from keeper_shared.messages.host import HostCapabilities, HostHeartbeat
from keeper_shared.messages.releases import (
    CURRENT_RELEASE,
    FROZEN_MANIFESTS,
    OLDEST_RELEASE,
    UnknownReleaseError,
    UpgradeLevel,
    current_manifest,
    upgrade_level,
)
from keeper_shared.messages.replies import DeleteVmSnapshotReply
from keeper_shared.messages.state import StateChange, StateChanged
from keeper_shared.messages.types import FencingToken, StateKind
from keeper_shared.messages.vm_snapshot import DeleteVmSnapshot
from keeper_shared.sealing.state_blobs import seal_state_blob
from keeper_shared.state_format.blobs import seal_blob
from support.memory_bus import MemoryBroker
from support.sealing_keys import new_keys


class Gauge(Payload):
    """A test command at v2 whose v1 had no ``unit``; only "celsius" exists in v1."""

    message_type = "test.gauge"
    schema_version = 2

    value: int = Field(description="The reading.")
    unit: str = Field(default="celsius", description="Its unit (new in v2).")


class GaugeRead(Payload):
    """The reply to a gauge."""

    message_type = "test.gauge.read"

    value: int = Field(description="The reading, echoed.")


TEST_LEVEL = UpgradeLevel(
    "0.1.0", {**FROZEN_MANIFESTS["0.1.0"], Gauge.message_type: 1, GaugeRead.message_type: 1}
)
"""Release 0.1.0, as if it had read the test's gauge at v1."""

GAUGES = QueueSpec(name="test.gauges", command_key="gauge-host", delivery_limit=1)


@pytest.fixture
def gauge_casters() -> Iterator[None]:
    @register_upcaster(Gauge.message_type, 1)
    def _gauge_v1(data: dict[str, Any]) -> dict[str, Any]:
        return {**data, "unit": "celsius"}

    @register_downcaster(Gauge.message_type, 2)
    def _gauge_v2_as_v1(data: dict[str, Any]) -> dict[str, Any]:
        if data["unit"] != "celsius":
            raise NotExpressibleError("test.gauge v1 has no unit; only celsius can be sent")
        return {"value": data["value"]}

    yield
    unregister_downcaster(Gauge.message_type, 2)
    unregister_upcaster(Gauge.message_type, 1)


def heartbeat(release: str = CURRENT_RELEASE) -> HostHeartbeat:
    capabilities = HostCapabilities(
        swtpm_version="0.8.0", libvirt_version="9.0.0", architectures=["x86_64"], uefi_firmware=True
    )
    return HostHeartbeat(
        host="hv01", interval_s=5, capabilities=capabilities, vms=[], release=release
    )


def test_the_current_manifest_is_read_from_the_payload_classes() -> None:
    manifest = current_manifest()
    assert manifest[HostHeartbeat.message_type] == HostHeartbeat.schema_version == 5
    assert Gauge.message_type not in manifest, "a test's payload is no part of a release"


CHANGED_SINCE_PREVIOUS_RELEASE = {
    HostHeartbeat.message_type,
    StateChanged.message_type,
    DeleteVmSnapshot.message_type,
    DeleteVmSnapshotReply.message_type,
}
"""Message types whose version differs from N-1's (docs/upgrades.md): each has a
downcaster to N-1's version, or is new and refused by a sender capped at N-1 (the client
then deletes a snapshot as N-1 did: the store's pin only)."""


def test_the_types_changed_since_the_previous_release_are_the_known_ones() -> None:
    previous = FROZEN_MANIFESTS[OLDEST_RELEASE]
    changed = {t for t, v in current_manifest().items() if previous.get(t) != v}
    assert changed == CHANGED_SINCE_PREVIOUS_RELEASE


@pytest.mark.parametrize(
    ("release", "level"),
    [
        ("0.1.0", "0.1.0"),
        ("0.1.7", "0.1.0"),
        (CURRENT_RELEASE, CURRENT_RELEASE),
        ("9.0.0", CURRENT_RELEASE),
    ],
)
def test_a_release_reads_the_manifest_of_the_newest_known_release_not_after_it(
    release: str, level: str
) -> None:
    assert upgrade_level(release).release == level


@pytest.mark.parametrize("release", ["0.0.9", "latest", "0.1", "1.2.3.4", ""])
def test_a_release_older_than_n_minus_1_or_malformed_is_unknown(release: str) -> None:
    with pytest.raises(UnknownReleaseError):
        upgrade_level(release)


def test_a_heartbeat_capped_at_0_1_0_is_the_v4_that_release_reads() -> None:
    envelope = new_envelope(heartbeat(), source="host-agent/hv01", subject="hv01")

    body = encode(envelope, version=upgrade_level("0.1.0").version_for(envelope.type))

    document = json.loads(body)
    assert document["schema_version"] == 4
    assert "release" not in document["data"]
    # Read back by this release: the v4 upcaster says who sends v4.
    assert decode(body, HostHeartbeat).data.release == "0.1.0"


def _inline_changes() -> StateChanged:
    """One change with its state inline, one by its hash alone."""
    store = new_keys()
    changes = []
    for generation, inline in ((1, True), (2, False)):
        blob = seal_blob(StateKind.TPM, b"tpm state", FencingToken(epoch=1, generation=generation))
        vm_id = f"00000000-0000-4000-8000-00000000000{generation}"
        changes.append(
            StateChange(
                vm_id=vm_id,
                kind=blob.kind,
                content_hash=blob.content_hash,
                size=blob.size,
                token=blob.token,
                sealed=seal_state_blob(vm_id, blob, store.public) if inline else None,
            )
        )
    return StateChanged(host="hv01", changes=changes)


def test_changes_capped_at_0_1_0_are_the_v2_hashes_that_release_fetches() -> None:
    event = _inline_changes()
    envelope = new_envelope(event, source="host-agent/hv01", subject="hv01")

    body = encode(envelope, version=upgrade_level("0.1.0").version_for(envelope.type))

    document = json.loads(body)
    assert document["schema_version"] == 2
    assert all("sealed" not in change for change in document["data"]["changes"])
    # Read back by this release: every change hash-only, so fetched as before.
    read = decode(body, StateChanged).data
    assert read.changes == [change.model_copy(update={"sealed": None}) for change in event.changes]


def test_uncapped_changes_keep_their_inline_state() -> None:
    event = _inline_changes()
    body = encode(new_envelope(event, source="host-agent/hv01", subject="hv01"))

    assert json.loads(body)["schema_version"] == 3
    assert decode(body, StateChanged).data == event


def test_an_uncapped_heartbeat_names_the_agents_release() -> None:
    envelope = new_envelope(heartbeat(), source="host-agent/hv01", subject="hv01")
    assert decode(encode(envelope), HostHeartbeat).data.release == CURRENT_RELEASE


def test_a_type_the_receivers_release_does_not_read_is_not_expressible() -> None:
    with pytest.raises(NotExpressibleError, match=r"release 0\.1\.0: it does not read"):
        upgrade_level("0.1.0").version_for(Gauge.message_type)


def test_a_step_without_a_downcaster_is_not_expressible() -> None:
    envelope = new_envelope(Gauge(value=3), source="test", subject="g")
    with pytest.raises(NotExpressibleError, match="no downcaster from v2"):
        encode(envelope, version=1)


def test_a_downcaster_refuses_data_the_older_version_cannot_hold(gauge_casters: None) -> None:
    assert json.loads(encode(new_envelope(Gauge(value=3), source="t", subject="g"), version=1))[
        "data"
    ] == {"value": 3}
    with pytest.raises(NotExpressibleError, match="only celsius"):
        encode(new_envelope(Gauge(value=3, unit="kelvin"), source="t", subject="g"), version=1)


def test_a_failing_downcaster_is_reported_without_the_data() -> None:
    @register_downcaster(Gauge.message_type, 2)
    def _broken(data: dict[str, Any]) -> dict[str, Any]:
        raise KeyError(f"secret-{data['value']}")

    try:
        with pytest.raises(NotExpressibleError) as caught:
            encode(new_envelope(Gauge(value=424242), source="t", subject="g"), version=1)
    finally:
        unregister_downcaster(Gauge.message_type, 2)
    assert "424242" not in str(caught.value)
    assert caught.value.__context__ is None or "424242" not in str(caught.value.__context__)


def test_the_configured_cap_comes_from_keeper_upgrade_level(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert configured_level().release == CURRENT_RELEASE
    monkeypatch.setenv("KEEPER_UPGRADE_LEVEL", "0.1.0")
    assert configured_level().release == "0.1.0"
    monkeypatch.setenv("KEEPER_UPGRADE_LEVEL", "0.0.1")
    with pytest.raises(UnknownReleaseError, match=r"upgrade it to 0\.1\.0 first"):
        configured_level()


def test_a_host_advertised_release_caps_its_commands_and_an_unknown_one_is_ignored() -> None:
    levels = ReceiverLevels(upgrade_level(CURRENT_RELEASE))
    target = host_command_key("hv01")
    assert levels.for_target(target).release == CURRENT_RELEASE
    levels.learn(target, "0.1.0")
    assert levels.for_target(target).release == "0.1.0"
    assert levels.for_target(host_command_key("hv02")).release == CURRENT_RELEASE
    levels.learn(target, "0.0.1")
    assert levels.for_target(target).release == "0.1.0"


def test_a_reply_goes_at_the_release_its_caller_named_or_the_oldest() -> None:
    assert ReceiverLevels.for_reply(CURRENT_RELEASE).release == CURRENT_RELEASE
    assert ReceiverLevels.for_reply(None).release == OLDEST_RELEASE
    assert ReceiverLevels.for_reply("garbage").release == OLDEST_RELEASE
    assert sender_release({RELEASE_HEADER: b"0.2.0"}) == "0.2.0"
    assert sender_release(None) is None


async def test_a_bus_client_capped_at_0_1_0_sends_heartbeats_as_v4() -> None:
    broker = MemoryBroker()
    agent = broker.client(source="host-agent/hv01", origin="hv01")
    agent.levels = ReceiverLevels(upgrade_level("0.1.0"))

    await agent.publish_event(heartbeat(), subject="hv01")

    ((_, body),) = broker.events
    assert json.loads(body)["schema_version"] == 4


async def test_a_command_the_hosts_release_cannot_read_is_refused_by_the_sender(
    gauge_casters: None,
) -> None:
    broker = MemoryBroker()
    handled: list[int] = []

    async def read(envelope: Envelope[Any], delivery: Delivery) -> GaugeRead:
        handled.append(envelope.data.value)
        return GaugeRead(value=envelope.data.value)

    host = broker.client(source="host-agent/gauge-host", origin="gauge-host")
    await host.consume(GAUGES, [Route(Gauge, read)], prefetch=1)
    policy = broker.client(source="policy", origin="policy")
    policy.levels = ReceiverLevels(TEST_LEVEL)

    reply = await policy.call("gauge-host", Gauge(value=7), GaugeRead, subject="g", timeout_s=5)
    assert reply.data.value == 7
    with capture_logs() as logs, pytest.raises(ReceiverCannotReadError, match="only celsius"):
        await policy.call(
            "gauge-host", Gauge(value=8, unit="kelvin"), GaugeRead, subject="g", timeout_s=5
        )
    await broker.settled()

    assert handled == [7], "the refused command never reached the host"
    assert broker.dead_lettered(GAUGES) == []
    assert any(log["event"].startswith("message not sent") for log in logs)
