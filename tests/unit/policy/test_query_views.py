"""The queries operators' tools send instead of reading Redis: their messages on the wire,
policy's and the store's views built from the records they keep, and the CLI's tables and
JSON built from those views. No I/O: the record hashes are given as Redis returns them."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from pydantic import ValidationError

from keeper_policy.hosts.registry import HostRecord
from keeper_policy.views.host_views import host_view, liveness
from keeper_policy.views.vm_views import vm_view
from keeper_shared.keeper_client.views import host_status_from, vm_status_from
from keeper_shared.messages.envelope import Payload, decode, encode, new_envelope
from keeper_shared.messages.host import HostCapabilities
from keeper_shared.messages.queries import (
    MAX_DESCRIBED_VMS,
    DescribeStoredState,
    HostsListed,
    ListHosts,
    ListVms,
    Liveness,
    NewestVersion,
    StoredStateDescribed,
    StoredVmState,
    VmsListed,
)
from keeper_shared.messages.state import VersionOrigin
from keeper_shared.messages.tpm import VmSpec
from keeper_shared.messages.types import FencingToken, StateKind
from keeper_state_store.storage.version_meta import VersionMeta, pack_version_meta
from keeper_state_store.views.newest_state import newest_version

VM_ID = "0d1e2f3a-4b5c-4d6e-8f70-8192a3b4c5d6"
NOW = 1_800_000_000.0
CAPABILITIES = HostCapabilities(
    swtpm_version="0.8.0",
    libvirt_version="10.0.0",
    architectures=["x86_64"],
    uefi_firmware=True,
)


def record(**fields: str | bytes) -> dict[bytes, bytes]:
    """A VM record hash as redis-py returns it (bytes keys and values)."""
    spec = VmSpec(vm_id=VM_ID, name="web-1", guest_os="windows-11", encrypt_tpm_state=True)
    raw: dict[str, str | bytes] = {"spec": spec.model_dump_json(), "tpm_xml": "<tpm/>", **fields}
    return {k.encode(): v if isinstance(v, bytes) else v.encode() for k, v in raw.items()}


def host(*, last_seen: float, lost_at: float | None = None) -> HostRecord:
    return HostRecord(
        host="host-a",
        capabilities=CAPABILITIES,
        last_seen=last_seen,
        cluster="rack-1",
        inventory={VM_ID: 3},
        lost_at=lost_at,
    )


# --- messages -----------------------------------------------------------------------


def _payloads() -> list[Payload]:
    view = vm_view(VM_ID, record(tpm_version="2", tpm_persisted_at=str(NOW)), {})
    assert view is not None
    return [
        ListVms(),
        ListVms(vm="web-1"),
        ListVms(vm=VM_ID),
        VmsListed(vms=[view]),
        ListHosts(),
        HostsListed(lost_after_s=30.0, hosts=[host_view(host(last_seen=NOW), NOW, 30.0)]),
        DescribeStoredState(vm_ids=[VM_ID]),
        StoredStateDescribed(
            vms=[
                StoredVmState(
                    vm_id=VM_ID,
                    has_data_key=True,
                    newest={
                        StateKind.TPM: NewestVersion(
                            version=4, stored_at=datetime.fromtimestamp(NOW, UTC), size=1234
                        )
                    },
                )
            ]
        ),
    ]


@pytest.mark.parametrize("payload", _payloads(), ids=lambda p: p.message_type)
def test_every_query_and_reply_round_trips(payload: Payload) -> None:
    envelope = new_envelope(payload, source="client/test", subject=VM_ID)
    assert decode(encode(envelope), type(payload)).data == payload


def test_typed_fields_travel_as_json_numbers_and_booleans() -> None:
    (listed,) = [p for p in _payloads() if isinstance(p, VmsListed)]
    document = json.loads(encode(new_envelope(listed, source="policy", subject="vms")))
    (vm,) = document["data"]["vms"]
    assert vm["epoch"] == 0
    assert vm["tpm_encrypted"] is True
    assert vm["persisted"]["tpm"]["version"] == 2


@pytest.mark.parametrize("reference", ["bad name!", "", "x" * 65])
def test_a_reference_that_names_nothing_is_refused(reference: str) -> None:
    with pytest.raises(ValidationError):
        ListVms(vm=reference)


def test_a_describe_asks_about_a_bounded_number_of_vms() -> None:
    with pytest.raises(ValidationError):
        DescribeStoredState(vm_ids=[VM_ID] * (MAX_DESCRIBED_VMS + 1))


# --- policy: VMs --------------------------------------------------------------------


def test_a_vm_view_carries_spec_placement_recovery_point_and_marks() -> None:
    view = vm_view(
        VM_ID,
        record(
            tpm_version="7",
            tpm_persisted_at=str(NOW),
            last_persisted_at=str(NOW),
            last_host="host-b",
            lost_from="host-b",
            tpm_stranded="on host-b: secret is private",
        ),
        {b"host": b"host-a", b"epoch": b"5", b"placed_at": str(NOW).encode()},
    )
    assert view is not None
    assert (view.name, view.guest_os, view.tpm_encrypted) == ("web-1", "windows-11", True)
    assert (view.host, view.epoch) == ("host-a", 5)
    assert view.persisted[StateKind.TPM].version == 7
    assert view.persisted[StateKind.TPM].persisted_at.timestamp() == NOW
    assert StateKind.NVRAM not in view.persisted
    assert (view.last_host, view.lost_from) == ("host-b", "host-b")
    assert view.tpm_stranded == "on host-b: secret is private"


def test_a_stopped_vm_has_no_host_and_an_unregistered_one_no_view() -> None:
    view = vm_view(VM_ID, record(), {b"host": b"", b"epoch": b"2"})
    assert view is not None
    assert (view.host, view.epoch) == (None, 2)
    assert vm_view(VM_ID, {}, {b"host": b"host-a", b"epoch": b"2"}) is None


def test_a_spec_of_another_schema_still_lists_the_vm() -> None:
    view = vm_view(VM_ID, record(spec=b'{"name": "web-1", "future_field": 1}'), {})
    assert view is not None
    assert (view.vm_id, view.name, view.guest_os, view.tpm_encrypted) == (
        VM_ID,
        None,
        None,
        False,
    )


# --- policy: hosts ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("last_seen", "lost_at", "expected"),
    [
        (NOW - 5, None, Liveness.ALIVE),
        (NOW - 30, None, Liveness.ALIVE),  # exactly the bound: not silent yet
        (NOW - 31, None, Liveness.SILENT),  # past it, before the checker declares it lost
        (NOW - 300, NOW - 200, Liveness.LOST),
        (NOW - 1, NOW - 200, Liveness.LOST),  # declared lost; its return is not handled yet
    ],
)
def test_liveness_follows_policys_rule(
    last_seen: float, lost_at: float | None, expected: Liveness
) -> None:
    assert liveness(host(last_seen=last_seen, lost_at=lost_at), NOW, 30.0) is expected


def test_a_host_view_counts_the_vms_of_its_last_heartbeat() -> None:
    view = host_view(host(last_seen=NOW - 60, lost_at=NOW - 20), NOW, 30.0)
    assert view.liveness is Liveness.LOST
    assert view.last_seen.timestamp() == NOW - 60
    assert view.lost_at is not None
    assert view.lost_at.timestamp() == NOW - 20
    assert (view.cluster, view.vms, view.capabilities) == ("rack-1", 1, CAPABILITIES)


# --- store --------------------------------------------------------------------------


def test_the_newest_version_shows_when_it_was_stored_and_its_size() -> None:
    stored_at = datetime.fromtimestamp(NOW, UTC)
    meta = VersionMeta(
        content_hash="a" * 64,
        size=540_672,
        token=FencingToken(epoch=3, generation=9),
        host="host-a",
        stored_at=stored_at,
        origin=VersionOrigin.HOST,
    )
    assert newest_version(4, pack_version_meta(meta)) == NewestVersion(
        version=4, stored_at=stored_at, size=540_672
    )


@pytest.mark.parametrize("meta", [None, b"\xffnot a record"])
def test_a_version_without_readable_metadata_still_shows(meta: bytes | None) -> None:
    assert newest_version(4, meta) == NewestVersion(version=4, stored_at=None, size=None)


# --- CLI ----------------------------------------------------------------------------


def test_status_puts_policys_view_and_the_stores_state_together() -> None:
    view = vm_view(VM_ID, record(nvram_version="2", nvram_persisted_at=str(NOW - 50)), {})
    assert view is not None
    stored = StoredVmState(
        vm_id=VM_ID,
        has_data_key=True,
        newest={
            StateKind.TPM: NewestVersion(
                version=3, stored_at=datetime.fromtimestamp(NOW - 10, UTC), size=100
            ),
            # Unreadable metadata: the time policy heard it was persisted stands in.
            StateKind.NVRAM: NewestVersion(version=2, stored_at=None, size=None),
        },
    )
    status = vm_status_from(view, stored)
    document = status.as_json(NOW)
    assert document["protection"] == "protected"
    assert document["state"]["tpm"]["version"] == 3
    assert document["state"]["tpm"]["size"] == 100
    assert document["state"]["nvram"]["age_s"] == 50.0
    assert document["newest_persisted_age_s"] == 10.0
    assert document["running"] is False
    assert document["tpm_encrypted"] is True

    nothing = vm_status_from(view, None).as_json(NOW)
    assert nothing["protection"] == "unprotected"
    assert set(nothing["state"]) == {kind.value for kind in StateKind}
    assert nothing["state"]["tpm"] == {
        "version": None,
        "persisted_at": None,
        "age_s": None,
        "size": None,
    }


def test_hosts_json_keeps_its_fields() -> None:
    status = host_status_from(host_view(host(last_seen=NOW - 40), NOW, 30.0))
    document = status.as_json(NOW)
    assert set(document) == {
        "host",
        "status",
        "last_seen",
        "last_seen_age_s",
        "cluster",
        "capabilities",
        "vms",
    }
    assert document["status"] == "silent"
    assert document["last_seen_age_s"] == 40.0
    assert document["capabilities"] == CAPABILITIES.model_dump(mode="json")
    assert document["vms"] == 1
