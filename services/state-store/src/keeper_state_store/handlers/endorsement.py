"""``state.ek.read``: the endorsement key of a VM's newest stored TPM, for attestation.

The EK is public, but it lives inside the TPM state, which is secret: the store loads a
private copy into a throwaway swtpm (as the scrubber does), reads the EK's public area and
its certificate with tpm2-tools, and answers with those only. Nothing of the state leaves.
"""

from __future__ import annotations

from pathlib import Path

import structlog
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from keeper_shared.bus.client import Delivery, Route
from keeper_shared.messages.endorsement import EndorsementKeyRead, ReadEndorsementKey
from keeper_shared.messages.envelope import Envelope
from keeper_shared.messages.types import StateKind
from keeper_shared.state_format.compression import BlobFormatError
from keeper_shared.state_format.tpm_archive import unpack_tpm_state
from keeper_shared.swtpm import SwtpmError
from keeper_state_store.crypto.encryption import DecryptionError
from keeper_state_store.crypto.tpm_secrets import TpmSecretVault
from keeper_state_store.scrub.tpm_probe import ek_readable, probe_tpm_state, swtpm_available
from keeper_state_store.storage.repository import StateRepository
from keeper_state_store.storage.version_reader import (
    VersionNotKeptError,
    VersionReader,
    VersionUnreadableError,
)
from keeper_state_store.transfer.moving import read_newest

log = structlog.get_logger(__name__)


class EndorsementKeys:
    """Answers ``state.ek.read`` for one store replica."""

    def __init__(self, repository: StateRepository, *, temp_dir: Path | None) -> None:
        self._repository = repository
        self._reader = VersionReader(repository.redis, repository.keys)
        self._secrets = TpmSecretVault(repository)
        self._temp_dir = temp_dir

    def command_routes(self) -> list[Route]:
        """Routes of this service on the store's commands queue."""
        return [Route(ReadEndorsementKey, self.on_read)]

    async def on_read(
        self, envelope: Envelope[ReadEndorsementKey], delivery: Delivery
    ) -> EndorsementKeyRead:
        """The EK (public key and certificate) of the VM's newest stored TPM version."""
        vm_id = envelope.data.vm_id

        def refused(reason: str) -> EndorsementKeyRead:
            return EndorsementKeyRead(vm_id=vm_id, ok=False, error=reason)

        if not (swtpm_available() and ek_readable()):
            return refused("this store replica has no swtpm and tpm2-tools to read an EK with")
        try:
            newest = await read_newest(self._repository, self._reader, vm_id, [StateKind.TPM])
            version = newest.get(StateKind.TPM)
            if version is None:
                return refused("the store holds no TPM state for this VM")
            secret = await self._secrets.held(vm_id)
            probe = await probe_tpm_state(
                unpack_tpm_state(version.content),
                temp_dir=self._temp_dir,
                ek_details=True,
                passphrase=secret.value.get_secret_value() if secret is not None else None,
            )
        except (VersionNotKeptError, VersionUnreadableError, DecryptionError) as error:
            return refused(f"the newest TPM version does not verify: {error}")
        except (BlobFormatError, SwtpmError) as error:
            log.warning("stored TPM state could not be loaded", vm_id=vm_id, reason=str(error))
            return refused(f"swtpm could not load the newest TPM version: {error}")
        if probe.ek_public_pem is None:
            return refused("the TPM has no EK at persistent handle 0x81010001")
        certificate = None
        if probe.ek_certificate_der is not None:
            try:
                parsed = x509.load_der_x509_certificate(probe.ek_certificate_der)
                certificate = parsed.public_bytes(Encoding.PEM).decode("ascii")
            except ValueError:
                log.warning("EK certificate in NV does not parse", vm_id=vm_id)
        return EndorsementKeyRead(
            vm_id=vm_id,
            ok=True,
            version=version.record.version,
            public_key_pem=probe.ek_public_pem,
            certificate_pem=certificate,
            public_area_sha256=probe.ek_sha256,
        )
