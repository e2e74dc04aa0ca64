"""Encrypted TPM state: the libvirt secret's place in messages, XML, sealing and logs.

The secret's value is as sensitive as the state it encrypts (invariant 4): masked in every
model, base64 only on the wire, never in a validation error (rendered logs: see
test_logging_redaction).
"""

from __future__ import annotations

import base64
import json
import secrets
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from pydantic import SecretBytes, ValidationError

from keeper_host_agent.hypervisor.domain_xml import DomainXmlError, fill_nvram_path, parse_domain
from keeper_host_agent.hypervisor.libvirt_secrets import keeper_usage_name, secret_xml
from keeper_policy.placement.domain_definition import domain_xml, with_tpm_encryption
from keeper_policy.tpm.rules import tpm_element
from keeper_shared.messages.envelope import MessageError, decode, encode, new_envelope
from keeper_shared.messages.host import HostCapabilities, HostHeartbeat
from keeper_shared.messages.state import RestoreState
from keeper_shared.messages.tpm import EnableTpm, TpmStateStranded, VmSpec
from keeper_shared.messages.types import MAX_TPM_SECRET_BYTES, TpmSecret
from keeper_shared.messages.vm import PrepareVm
from keeper_shared.sealing.construction import SealingError
from keeper_shared.sealing.state_blobs import open_tpm_secret, seal_tpm_secret
from keeper_state_store.crypto.encryption import (
    DecryptionError,
    blob_associated_data,
    decrypt_blob,
    encrypt_blob,
    new_data_key,
    tpm_secret_associated_data,
)
from keeper_state_store.crypto.tpm_secrets import new_secret_value
from support.leak_scan import leak_forms
from support.sealing_keys import new_keys

VM_ID = "6b2f7e0a-3c1d-4d6e-9a8b-1c2d3e4f5a6b"
SECRET_UUID = "0c6a4b7e-54a4-4bb5-a0d2-6e3b3f1e2d11"
ROOT = Path("/var/lib/libvirt/swtpm")
NVRAM_DIR = Path("/var/lib/libvirt/qemu/nvram")


@pytest.fixture
def value() -> bytes:
    """A secret value as the store makes them."""
    return new_secret_value()


HOST_KEYS = new_keys()
"""The host the prepares below are sealed to."""


def _prepare(value: bytes) -> PrepareVm:
    secret = TpmSecret(uuid=SECRET_UUID, value=SecretBytes(value))
    return PrepareVm(
        vm_id=VM_ID,
        name="win11",
        epoch=3,
        tpm_secret=seal_tpm_secret(VM_ID, secret, HOST_KEYS.public, command_epoch=3),
    )


def _contains_any_form(text: str | bytes, value: bytes) -> bool:
    data = text.encode() if isinstance(text, str) else text
    return any(form in data for form in leak_forms(value))


# --- the value itself ---------------------------------------------------------------------


def test_new_values_are_random_printable_passphrases() -> None:
    values = {new_secret_value() for _ in range(50)}
    assert len(values) == 50
    for value in values:
        assert len(value) >= 43  # 32 random bytes, URL-safe base64
        assert value.decode("ascii").isprintable()


# --- messages ---------------------------------------------------------------------------


def test_the_value_is_sealed_on_the_wire_and_opens_only_for_the_host(value: bytes) -> None:
    prepare = _prepare(value)

    assert not _contains_any_form(repr(prepare), value)
    assert not _contains_any_form(str(prepare), value)
    wire = encode(new_envelope(prepare, source="state-store", subject=VM_ID))
    assert not _contains_any_form(wire, value)
    assert json.loads(wire)["data"]["tpm_secret"]["uuid"] == SECRET_UUID
    decoded = decode(wire, PrepareVm).data
    assert decoded.tpm_secret is not None
    opened = open_tpm_secret(VM_ID, decoded.tpm_secret, HOST_KEYS, command_epoch=3)
    assert opened.value.get_secret_value() == value
    with pytest.raises(SealingError):
        open_tpm_secret(VM_ID, decoded.tpm_secret, new_keys(), command_epoch=3)


def test_a_tpm_secret_value_over_the_limit_is_refused_without_quoting_it() -> None:
    huge = secrets.token_urlsafe(MAX_TPM_SECRET_BYTES).encode()
    with pytest.raises(ValidationError) as refused:
        TpmSecret(uuid=SECRET_UUID, value=SecretBytes(huge))

    assert "value" in str(refused.value)
    assert not _contains_any_form(str(refused.value), huge[:64])


def test_clear_secrets_of_older_senders_are_refused(value: bytes) -> None:
    """v2 prepares and fetch replies carried the value in clear: no upcaster reads them."""
    body = json.loads(encode(new_envelope(_prepare(value), source="old", subject=VM_ID)))
    body["schema_version"] = 2
    body["data"]["tpm_secret"] = {"uuid": SECRET_UUID, "value": base64.b64encode(value).decode()}

    with pytest.raises(MessageError, match="schema version 2 is not supported"):
        decode(json.dumps(body).encode(), PrepareVm)


@pytest.mark.parametrize("bad", ["", "not-a-uuid", "{" + SECRET_UUID + "}"])
def test_the_secret_uuid_must_be_a_canonical_uuid(bad: str) -> None:
    with pytest.raises(ValidationError, match="uuid"):
        TpmSecret(uuid=bad, value=SecretBytes(b"v"))
    assert TpmSecret(uuid=SECRET_UUID.upper(), value=SecretBytes(b"v")).uuid == SECRET_UUID


def test_an_empty_value_is_refused() -> None:
    with pytest.raises(ValidationError, match="value"):
        TpmSecret(uuid=SECRET_UUID, value=SecretBytes(b""))


@pytest.mark.parametrize(
    ("payload", "field", "default"),
    [
        (
            RestoreState(vm_id=VM_ID, name="win11", host="hv01", epoch=2),
            "encrypt_tpm_state",
            False,
        ),
        (
            EnableTpm(spec=VmSpec(vm_id=VM_ID, name="w", guest_os="windows-11")),
            "allow_duplicate_name",  # v3's field: a v1 message lacks it too
            False,
        ),
    ],
    ids=["state.restore", "tpm.enable"],
)
def test_version_1_messages_are_still_read(
    payload: RestoreState | EnableTpm,
    field: str | None,
    default: object,
) -> None:
    """Senders not yet upgraded send v1, without the new fields: their defaults apply."""
    assert type(payload).schema_version >= 2
    body = json.loads(encode(new_envelope(payload, source="old", subject=VM_ID)))
    body["schema_version"] = 1
    if field is not None:
        del body["data"][field]
    for newer in ("encrypt_tpm_state", "vcpus", "disks", "interfaces"):
        body["data"].get("spec", {}).pop(newer, None)

    read = decode(json.dumps(body).encode(), type(payload)).data

    assert read == payload
    if field is not None:
        assert getattr(read, field) == default


def test_a_version_1_heartbeat_says_its_host_keeps_no_secrets() -> None:
    """Hosts not yet upgraded never announce secrets: an encrypted TPM is not sent there."""
    capabilities = HostCapabilities(
        swtpm_version="0.7.1",
        libvirt_version="9.0.0",
        architectures=["x86_64"],
        uefi_firmware=True,
        tpm_secrets=True,
    )
    beat = HostHeartbeat(host="hv01", interval_s=5, capabilities=capabilities, vms=[])
    body = json.loads(encode(new_envelope(beat, source="old", subject="hv01")))
    body["schema_version"] = 1
    del body["data"]["capabilities"]["tpm_secrets"]
    del body["data"]["capabilities"]["kvm"]

    read = decode(json.dumps(body).encode(), HostHeartbeat).data

    assert not read.capabilities.tpm_secrets


def test_the_stranded_event_names_the_secret_but_carries_no_value() -> None:
    event = TpmStateStranded(
        vm_id=VM_ID, host="hv01", secret_uuid=SECRET_UUID, reason="secret is private"
    )
    assert set(json.loads(event.model_dump_json())) == {"vm_id", "host", "secret_uuid", "reason"}


# --- sealing at rest -------------------------------------------------------------------------


def test_a_sealed_secret_opens_only_for_its_vm_and_uuid(value: bytes) -> None:
    key = new_data_key()
    sealed = encrypt_blob(key, value, tpm_secret_associated_data(VM_ID, SECRET_UUID))

    assert decrypt_blob(key, sealed, tpm_secret_associated_data(VM_ID, SECRET_UUID)) == value
    assert not _contains_any_form(sealed, value)
    other_vm = str(uuid.uuid4())
    for wrong in (
        tpm_secret_associated_data(other_vm, SECRET_UUID),
        tpm_secret_associated_data(VM_ID, str(uuid.uuid4())),
        blob_associated_data(VM_ID, "tpm", 0, 0, "0" * 64),
    ):
        with pytest.raises(DecryptionError):
            decrypt_blob(key, sealed, wrong)


# --- domain XML: policy writes it, the host reads it back -----------------------------


def test_policy_adds_the_encryption_element_and_discovery_finds_it() -> None:
    spec = VmSpec(vm_id=VM_ID, name="win11", guest_os="windows-11", encrypt_tpm_state=True)
    xml = domain_xml(
        spec,
        tpm_xml=with_tpm_encryption(tpm_element("tpm-crb"), SECRET_UUID.upper()),
        epoch=4,
        ovmf_code=Path("/usr/share/OVMF/OVMF_CODE_4M.fd"),
        ovmf_vars_template=Path("/usr/share/OVMF/OVMF_VARS_4M.fd"),
    )
    backend = ET.fromstring(xml).find("devices/tpm/backend")  # noqa: S314 - our own XML
    assert backend is not None
    assert backend.attrib == {"type": "emulator", "version": "2.0"}
    encryption = backend.find("encryption")
    assert encryption is not None
    assert encryption.attrib == {"secret": SECRET_UUID}

    location = parse_domain(fill_nvram_path(xml, NVRAM_DIR), swtpm_root=ROOT, nvram_dir=NVRAM_DIR)
    assert location is not None
    assert location.tpm_secret_uuid == SECRET_UUID
    assert location.tpm_dir == ROOT / VM_ID / "tpm2"


def test_adding_encryption_twice_keeps_one_element() -> None:
    once = with_tpm_encryption(tpm_element("tpm-crb"), SECRET_UUID)
    other = str(uuid.uuid4())
    twice = with_tpm_encryption(once, other)
    encryptions = ET.fromstring(twice).findall("backend/encryption")  # noqa: S314 - our own
    assert [element.get("secret") for element in encryptions] == [other]


def test_only_an_emulated_tpm_is_encrypted() -> None:
    passthrough = "<tpm model='tpm-tis'><backend type='passthrough'/></tpm>"
    with pytest.raises(ValueError, match="emulated"):
        with_tpm_encryption(passthrough, SECRET_UUID)


def _domain(backend: str) -> str:
    return (
        f"<domain><name>w</name><uuid>{VM_ID}</uuid><os><nvram/></os>"
        f"<devices><tpm model='tpm-crb'>{backend}</tpm></devices></domain>"
    )


def test_a_tpm_without_encryption_has_no_secret() -> None:
    location = parse_domain(
        _domain("<backend type='emulator' version='2.0'/>"), swtpm_root=ROOT, nvram_dir=NVRAM_DIR
    )
    assert location is not None
    assert location.tpm_secret_uuid is None


def test_an_encryption_secret_that_is_not_a_uuid_is_refused() -> None:
    xml = _domain("<backend type='emulator' version='2.0'><encryption secret='../x'/></backend>")
    with pytest.raises(DomainXmlError, match="not a UUID"):
        parse_domain(xml, swtpm_root=ROOT, nvram_dir=NVRAM_DIR)


def test_the_keepers_libvirt_secret_is_private_persistent_vtpm_and_holds_no_value() -> None:
    secret = ET.fromstring(secret_xml(VM_ID, SECRET_UUID))  # noqa: S314 - our own XML
    assert secret.attrib == {"ephemeral": "no", "private": "yes"}
    assert secret.findtext("uuid") == SECRET_UUID
    usage = secret.find("usage")
    assert usage is not None
    assert usage.get("type") == "vtpm"
    assert usage.findtext("name") == keeper_usage_name(VM_ID)
    assert secret.find("value") is None
