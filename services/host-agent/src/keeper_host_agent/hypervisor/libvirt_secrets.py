"""The libvirt secrets swtpm encrypts TPM state with (usage type ``vtpm``).

A domain whose TPM has ``<encryption secret='UUID'/>`` gets its state encrypted by swtpm
with that secret's value; on a host without the secret the state cannot be read. So the
keeper defines the secret (private, persistent) before the VM starts on a host, removes it
with the VM, and reads a secret it did not create where libvirt allows.

The keeper's own secrets are recognised by their usage name, ``vtpm-keeper-<vm id>``: one
per VM, so removal needs no UUID, and a secret someone else defined is never touched.

Every function here blocks (libvirt calls): ``LibvirtHypervisor`` runs them in a worker
thread. The secret's value only ever passes through ``TpmSecret`` (masked) and libvirt;
errors are the agent's (``TpmSecretError`` or another ``HypervisorError``) and carry
libvirt's text, which never includes a value.
"""

from __future__ import annotations

import hmac

import libvirt
from pydantic import SecretBytes

from keeper_host_agent.hypervisor.errors import (
    AccessDeniedError,
    HypervisorError,
    InvalidSecretError,
    SecretNotFoundError,
    TpmSecretError,
    TpmSecretUnreadableError,
    UnsupportedError,
)
from keeper_host_agent.hypervisor.libvirt_errors import translating
from keeper_shared.messages.types import TpmSecret

KEEPER_USAGE_PREFIX = "vtpm-keeper-"


def keeper_usage_name(vm_id: str) -> str:
    """The usage name of the secret the keeper defines for ``vm_id``."""
    return f"{KEEPER_USAGE_PREFIX}{vm_id}"


def secret_xml(vm_id: str, secret_uuid: str) -> str:
    """The keeper's secret definition: private (its value cannot be read back through the
    API) and persistent (it survives a libvirtd restart while the VM is defined here)."""
    return (
        "<secret ephemeral='no' private='yes'>"
        f"<uuid>{secret_uuid}</uuid>"
        f"<description>vTPM Keeper: TPM state key of VM {vm_id}</description>"
        f"<usage type='vtpm'><name>{keeper_usage_name(vm_id)}</name></usage>"
        "</secret>"
    )


def _lookup(connection: libvirt.virConnect, secret_uuid: str) -> libvirt.virSecret | None:
    try:
        with translating():
            return connection.secretLookupByUUIDString(secret_uuid)
    except SecretNotFoundError:
        return None
    except UnsupportedError as error:
        raise TpmSecretError(f"this host's libvirt has no secret driver: {error}") from None


def define_tpm_secret(connection: libvirt.virConnect, vm_id: str, secret: TpmSecret) -> bool:
    """Make ``secret`` available to swtpm on this host; False when it already was.

    Usually that defines (or updates) the keeper's secret for ``vm_id``. A secret with that
    UUID that someone else defined (a domain that came with its own, back on its host) is
    left as it is, never overwritten: refused when libvirt shows it holds another value,
    trusted when it is private (swtpm then says at the start if it is not the right one)."""
    existing = _lookup(connection, secret.uuid)
    if existing is not None and existing.usageID() != keeper_usage_name(vm_id):
        if _other_value(existing, secret.value.get_secret_value()):
            raise TpmSecretError(
                f"secret {secret.uuid} already exists on this host for another use "
                f"({existing.usageID()!r}) with another value; not overwriting it"
            )
        return False
    if existing is None:
        # A keeper secret of this VM under another UUID (the store's was made again) would
        # make libvirt refuse the new one: one secret per usage name.
        remove_tpm_secret(connection, vm_id)
    created = existing is None
    try:
        with translating():
            defined = connection.secretDefineXML(secret_xml(vm_id, secret.uuid))
    except HypervisorError as error:
        raise TpmSecretError(f"secret {secret.uuid} not defined: {error}") from None
    try:
        with translating():
            defined.setValue(secret.value.get_secret_value())
    except HypervisorError as error:
        if created:
            defined.undefine()
        raise TpmSecretError(f"value of secret {secret.uuid} not set: {error}") from None
    return True


def _other_value(existing: libvirt.virSecret, value: bytes) -> bool:
    """True when libvirt reveals ``existing``'s value and it is not ``value``."""
    try:
        with translating():
            revealed = existing.value()
    except HypervisorError:
        return False  # private, or no value set: nothing to compare
    return not hmac.compare_digest(revealed, value)


def remove_tpm_secret(connection: libvirt.virConnect, vm_id: str) -> bool:
    """Remove the keeper's secret for ``vm_id``; False when there is none (or no secret
    driver, as with ``test:///``, where none can have been defined)."""
    try:
        with translating():
            secret = connection.secretLookupByUsage(
                libvirt.VIR_SECRET_USAGE_TYPE_VTPM, keeper_usage_name(vm_id)
            )
    except (SecretNotFoundError, UnsupportedError):
        return False
    secret.undefine()
    return True


def read_foreign_secret(
    connection: libvirt.virConnect, vm_id: str, secret_uuid: str
) -> TpmSecret | None:
    """The value of a secret a domain's TPM names, when the keeper did not define it (None
    when it did: the store already holds that one). Raises ``TpmSecretUnreadableError``
    when the secret is private or missing."""
    secret = _lookup(connection, secret_uuid)
    if secret is None:
        raise TpmSecretUnreadableError(f"secret {secret_uuid} is not defined on this host")
    if secret.usageID() == keeper_usage_name(vm_id):
        return None
    try:
        with translating():
            value = secret.value()
    except (InvalidSecretError, AccessDeniedError):
        # libvirtd answers a private secret with "Invalid secret: secret is private"; a
        # connection without the right (polkit, read-only) with "operation denied".
        raise TpmSecretUnreadableError(
            f"secret {secret_uuid} is private: libvirt does not reveal its value"
        ) from None
    except SecretNotFoundError:
        raise TpmSecretUnreadableError(f"secret {secret_uuid} has no value") from None
    return TpmSecret(uuid=secret_uuid, value=SecretBytes(value))
