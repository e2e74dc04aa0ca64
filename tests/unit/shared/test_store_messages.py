"""The store's newer commands on the wire: history, restore choices, snapshots, clone,
export and import. Every one round-trips through the envelope; passphrases and bundles are
masked everywhere but the wire, and a bad one is refused without being quoted."""

from __future__ import annotations

import base64
import json
import os
from datetime import UTC, datetime

import pytest
from pydantic import SecretBytes, ValidationError

from keeper_shared.messages.envelope import MessageError, Payload, decode, encode, new_envelope
from keeper_shared.messages.snapshot import (
    CreateSnapshot,
    DeleteSnapshot,
    ListSnapshots,
    SnapshotInfo,
    SnapshotList,
)
from keeper_shared.messages.state import (
    KindHistory,
    ListStateHistory,
    RestoreState,
    StateHistory,
    StateVersionInfo,
    VersionOrigin,
)
from keeper_shared.messages.transfer import (
    CloneTpm,
    CloneVm,
    ExportState,
    ImportState,
    StateExported,
)
from keeper_shared.messages.types import FencingToken, StateKind
from keeper_shared.sealing.construction import SealingError
from keeper_shared.sealing.passphrases import (
    export_binding,
    import_binding,
    open_passphrase,
    seal_passphrase,
)
from support.sealing_keys import new_keys

VM_ID = "0d1e2f3a-4b5c-4d6e-8f70-8192a3b4c5d6"
OTHER_VM_ID = "1e2f3a4b-5c6d-4e7f-8091-a2b3c4d5e6f7"
PASSPHRASE = "a passphrase nobody may log"
BUNDLE = b"VTPMKEEP" + os.urandom(200)
STORE_KEYS = new_keys()


def _payloads() -> list[Payload]:
    info = StateVersionInfo(
        version=3,
        content_hash="a" * 64,
        size=10,
        token=FencingToken(epoch=2, generation=5),
        host="host-a",
        origin=VersionOrigin.HOST,
        stored_at=datetime.now(UTC),
        in_history=False,
        snapshots=["nightly.1"],
        flags={"ok": False, "reason": "hash mismatch", "previous_good_version": 2},
    )
    return [
        ListStateHistory(vm_id=VM_ID),
        StateHistory(
            vm_id=VM_ID,
            kinds=[KindHistory(kind=StateKind.TPM, head_version=5, versions=[info])],
        ),
        RestoreState(
            vm_id=VM_ID,
            name="vm1",
            host="host-b",
            epoch=4,
            versions={StateKind.TPM: 3},
            allow_older=True,
        ),
        RestoreState(vm_id=VM_ID, name="vm1", host="host-b", epoch=4, snapshot_id="nightly.1"),
        CreateSnapshot(vm_id=VM_ID, snapshot_id="before-upgrade"),
        DeleteSnapshot(vm_id=VM_ID, snapshot_id="before-upgrade"),
        ListSnapshots(vm_id=VM_ID),
        SnapshotList(
            vm_id=VM_ID,
            snapshots=[
                SnapshotInfo(
                    snapshot_id="s1", created_at=datetime.now(UTC), versions={StateKind.NVRAM: 1}
                )
            ],
        ),
        CloneVm(source_vm_id=VM_ID, target_vm_id=OTHER_VM_ID, tpm=CloneTpm.FRESH),
        ExportState(
            vm_id=VM_ID,
            passphrase=seal_passphrase(PASSPHRASE, STORE_KEYS.public, export_binding(VM_ID)),
        ),
        StateExported(vm_id=VM_ID, bundle=SecretBytes(BUNDLE)),
        StateExported(vm_id=VM_ID, error="VM has no state"),
        ImportState(
            bundle=SecretBytes(BUNDLE),
            passphrase=seal_passphrase(
                PASSPHRASE, STORE_KEYS.public, import_binding(BUNDLE, OTHER_VM_ID)
            ),
            target_vm_id=OTHER_VM_ID,
        ),
    ]


@pytest.mark.parametrize("payload", _payloads(), ids=lambda p: type(p).__name__)
def test_every_new_message_round_trips(payload: Payload) -> None:
    envelope = new_envelope(payload, source="test", subject=VM_ID)
    assert decode(encode(envelope), type(payload)) == envelope


def test_the_passphrase_travels_sealed_to_the_store_and_bound_to_its_bundle() -> None:
    binding = import_binding(BUNDLE, None)
    request = ImportState(
        bundle=SecretBytes(BUNDLE),
        passphrase=seal_passphrase(PASSPHRASE, STORE_KEYS.public, binding),
    )
    envelope = new_envelope(request, source="test", subject=VM_ID)
    wire = encode(envelope)

    decoded = decode(wire, ImportState)
    opened = open_passphrase(decoded.data.passphrase, STORE_KEYS, binding)
    assert opened.get_secret_value() == PASSPHRASE
    assert decoded.data.bundle.get_secret_value() == BUNDLE
    shown = repr(envelope) + str(envelope) + repr(decoded.data) + wire.decode()
    assert PASSPHRASE not in shown
    assert base64.b64encode(PASSPHRASE.encode()).decode()[:16] not in shown
    assert BUNDLE.hex()[:40] not in shown
    with pytest.raises(SealingError):
        open_passphrase(decoded.data.passphrase, STORE_KEYS, import_binding(b"other", None))
    with pytest.raises(SealingError):
        open_passphrase(decoded.data.passphrase, STORE_KEYS, import_binding(BUNDLE, OTHER_VM_ID))


def test_a_clear_passphrase_of_an_older_client_is_refused_without_quoting_it() -> None:
    sealed = seal_passphrase(PASSPHRASE, STORE_KEYS.public, export_binding(VM_ID))
    envelope = new_envelope(ExportState(vm_id=VM_ID, passphrase=sealed), source="t", subject=VM_ID)
    body = json.loads(encode(envelope))
    body["schema_version"] = 1
    body["data"]["passphrase"] = PASSPHRASE
    with pytest.raises(MessageError, match="schema version 1 is not supported") as refused:
        decode(json.dumps(body).encode(), ExportState)
    assert PASSPHRASE not in str(refused.value)
    assert "'short'" not in str(refused.value)


def test_restore_takes_versions_or_a_snapshot_not_both() -> None:
    with pytest.raises(ValidationError, match="mutually exclusive"):
        RestoreState(
            vm_id=VM_ID,
            name="vm1",
            host="host-b",
            epoch=2,
            versions={StateKind.TPM: 1},
            snapshot_id="s1",
        )


def test_restore_defaults_to_the_newest_and_refuses_rollback() -> None:
    request = RestoreState(vm_id=VM_ID, name="vm1", host="host-b", epoch=2)
    assert (request.versions, request.snapshot_id, request.allow_older) == (None, None, False)


@pytest.mark.parametrize("name", ["", "-leading-dash", "a/b", "x" * 65, "spa ce", "../up"])
def test_snapshot_ids_are_short_plain_names(name: str) -> None:
    with pytest.raises(ValidationError):
        CreateSnapshot(vm_id=VM_ID, snapshot_id=name)


def test_version_numbers_start_at_one() -> None:
    with pytest.raises(ValidationError):
        RestoreState(vm_id=VM_ID, name="vm1", host="h", epoch=2, versions={StateKind.TPM: 0})
