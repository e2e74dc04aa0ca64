"""Persisting what one ``state.fetch`` brought back, as one batch.

Every blob is verified, sealed under its VM's data key (every key read in one round trip) and
written by its own fenced script, all in one Redis pipeline with one wait for the replicas:
a batch of a hundred TPM states costs one round trip and shares one AOF fsync instead of
two round trips each. Batches from different hosts that are ready together share that
pipeline too (see `keeper_state_store.handlers.coalescer`), so spreading the same
VMs over more hosts does not multiply the round trips. Only then is each stored version
announced ``state.persisted``.

Each TPM version's identity (a fingerprint of its endorsement primary seed, read in
microseconds; see `keeper_state_store.identity.fingerprint`) goes with its write, and the
fenced script judges it against the VM's own at once (invariant 10): a TPM replaced unasked
is stored, flagged and announced ``state.tpm.reset`` right after its ``state.persisted``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass

import structlog
from redis.exceptions import RedisError

from keeper_shared.bus.client import BusClient
from keeper_shared.messages.state import FetchedVmState, StatePersisted, StateWriteRefused
from keeper_shared.messages.types import StateBlob, StateKind, TpmSecret
from keeper_shared.observability import metrics
from keeper_shared.runtime.cpu_work import run_sized
from keeper_shared.state_format.blobs import open_blob
from keeper_shared.state_format.compression import BlobFormatError
from keeper_state_store.crypto.sealing import BlobSealer
from keeper_state_store.crypto.tpm_secrets import TpmSecretVault
from keeper_state_store.handlers.coalescer import Coalescer
from keeper_state_store.handlers.reasons_said import ReasonsSaid
from keeper_state_store.handlers.tpm_reset import TpmResetAnnouncer
from keeper_state_store.identity.fingerprint import TpmIdentity, archive_identity
from keeper_state_store.storage.repository import (
    StateRepository,
    VersionWrite,
    WriteOutcome,
    WriteResult,
)

log = structlog.get_logger(__name__)

PERSISTED_PUBLISH_ATTEMPTS = 3
"""Publishes of a ``state.persisted`` before its event is given back for redelivery."""

BatchResults = dict[str, BaseException | None]
"""Per VM: None when its blobs were handled (stored, duplicate or refused), else the error
that kept them from being; that VM's event is then redelivered."""


@dataclass(frozen=True)
class _Received:
    """A blob of one VM from one host, as fetched or sent inline."""

    host: str
    vm_id: str
    blob: StateBlob


@dataclass(frozen=True)
class _PendingWrite:
    """A verified blob of one VM from one host, waiting for its shared pipeline."""

    host: str
    vm_id: str
    blob: StateBlob
    identity: TpmIdentity | None


class FetchedStateWriter:
    """Verifies, seals, writes and announces the blobs of one fetch reply."""

    def __init__(
        self,
        repository: StateRepository,
        sealer: BlobSealer,
        secrets: TpmSecretVault,
        bus: BusClient,
        resets: TpmResetAnnouncer,
        *,
        max_coalesced_writes: int = 500,
        coalesced_writes_in_flight: int = 2,
    ) -> None:
        self._repository = repository
        self._sealer = sealer
        self._secrets = secrets
        self._bus = bus
        self._resets = resets
        self._unreadable = ReasonsSaid()
        """VMs whose TPM identity was last not readable, and why."""
        self._coalescer: Coalescer[_PendingWrite, WriteResult | RedisError] = Coalescer(
            self._write_all,
            lambda pending: (pending.vm_id, pending.blob.kind),
            max_items=max_coalesced_writes,
            max_in_flight=coalesced_writes_in_flight,
        )

    async def close(self) -> None:
        """Cancel writes still waiting to be coalesced (their callers see it)."""
        await self._coalescer.close()

    async def _write_all(self, pending: list[_PendingWrite]) -> list[WriteResult | RedisError]:
        """Seal every blob (each VM's data key read in one round trip) and write them all
        in one pipeline with one wait for the replicas; one result per write, in order."""
        sealed = await self._sealer.seal_all([(item.vm_id, item.blob) for item in pending])
        results = await self._repository.write_versions(
            [
                VersionWrite(
                    vm_id=item.vm_id,
                    kind=item.blob.kind,
                    host=item.host,
                    token=item.blob.token,
                    content_hash=item.blob.content_hash,
                    size=item.blob.size,
                    sealed=ciphertext,
                    swtpm_version=item.blob.swtpm_version,
                    tpm_identity=(
                        None if item.identity is None else item.identity.fingerprint or ""
                    ),
                    tpm_profile=None if item.identity is None else item.identity.profile,
                )
                for item, ciphertext in zip(pending, sealed, strict=True)
            ]
        )
        stored = [
            f"{item.vm_id}/{item.blob.kind.value}/{result.detail} from {item.host}"
            for item, result in zip(pending, results, strict=True)
            if isinstance(result, WriteResult) and result.outcome is WriteOutcome.STORED
        ]
        if stored:
            # One line per shared pipeline, naming each VM, kind, version and host: a line
            # per version was a sixth of the store's CPU per stored version, and a line per
            # host's batch still a twelfth when a thousand hosts sent one change each.
            log.info("states persisted", count=len(stored), stored=stored)
        return results

    async def persist(self, host: str, vm_states: Sequence[FetchedVmState]) -> BatchResults:
        """Write every VM's blobs from ``host``; a failure is reported per VM."""
        return await self.persist_from([(host, vm_state) for vm_state in vm_states])

    async def persist_from(self, vm_states: Sequence[tuple[str, FetchedVmState]]) -> BatchResults:
        """Write every VM's blobs, each VM's from the host named beside it (one host per
        VM); a failure is reported per VM."""
        began = time.perf_counter()
        results: BatchResults = {vm_state.vm_id: None for _, vm_state in vm_states}
        # A VM's secret is kept before its state: encrypted state without it opens nowhere.
        with_secret = [(host, state) for host, state in vm_states if state.tpm_secret is not None]
        secrets = await asyncio.gather(
            *(
                self._keep_secret(vm_state.vm_id, host, vm_state.tpm_secret)
                for host, vm_state in with_secret
            ),
            return_exceptions=True,
        )
        for (_, vm_state), kept in zip(with_secret, secrets, strict=True):
            if isinstance(kept, BaseException):
                self._failed(results, [vm_state.vm_id], kept)
        blobs = [
            _Received(host, vm_state.vm_id, blob)
            for host, vm_state in vm_states
            if results[vm_state.vm_id] is None
            for blob in vm_state.blobs
        ]
        opened = await asyncio.gather(*(self._verify(item) for item in blobs))
        to_write = [
            (item, content)
            for item, content in zip(blobs, opened, strict=True)
            if content is not None
        ]
        if not to_write:
            return results
        try:
            identities = await asyncio.gather(
                *(self._identity(item.vm_id, item.blob, content) for item, content in to_write)
            )
            pending = [
                _PendingWrite(item.host, item.vm_id, item.blob, identity)
                for (item, _), identity in zip(to_write, identities, strict=True)
            ]
            outcomes = await self._coalescer.call(pending)
        except Exception as error:
            self._failed(results, [item.vm_id for item, _ in to_write], error)
            return results
        elapsed = time.perf_counter() - began
        written = []
        for write, outcome in zip(pending, outcomes, strict=True):
            if isinstance(outcome, RedisError):
                self._failed(results, [write.vm_id], outcome)
            else:
                written.append((write, outcome))
        reports = await asyncio.gather(
            *(self._report(write, outcome, elapsed) for write, outcome in written),
            return_exceptions=True,
        )
        for (write, _), reported in zip(written, reports, strict=True):
            if isinstance(reported, Exception):
                self._failed(results, [write.vm_id], reported)
            elif isinstance(reported, BaseException):
                raise reported
        return results

    async def refuse(self, vm_id: str, kind: StateKind, host: str, reason: str) -> None:
        """Log and announce ``state.refused``: this state was not written, and why."""
        log.warning("write refused", vm_id=vm_id, kind=kind.value, from_host=host, reason=reason)
        await self._bus.publish_event(
            StateWriteRefused(vm_id=vm_id, kind=kind, host=host, reason=reason), subject=vm_id
        )

    @staticmethod
    def _failed(results: BatchResults, vm_ids: list[str], error: BaseException) -> None:
        for vm_id in dict.fromkeys(vm_ids):
            log.warning("persisting failed", vm_id=vm_id, reason=type(error).__name__)
            results[vm_id] = error

    async def _keep_secret(self, vm_id: str, host: str, secret: TpmSecret | None) -> None:
        """Keep the secret a host read from the VM's domain (the keeper did not create it):
        without it the VM's encrypted TPM state cannot be used on any other host."""
        if secret is not None and await self._secrets.keep(vm_id, secret):
            log.info("TPM secret kept", vm_id=vm_id, tpm_secret_id=secret.uuid, from_host=host)

    async def _verify(self, received: _Received) -> bytes | None:
        """The blob's content when it opens to its declared size and hash; refused (None)
        when not."""
        blob = received.blob
        metrics.PULLED_BYTES.labels(kind=blob.kind.value).inc(blob.size)
        try:
            return await run_sized(blob.size, open_blob, blob)
        except BlobFormatError as error:
            metrics.PERSISTED.labels(kind=blob.kind.value, outcome="refused").inc()
            await self.refuse(
                received.vm_id, blob.kind, received.host, f"blob does not verify: {error}"
            )
            return None

    async def _identity(self, vm_id: str, blob: StateBlob, content: bytes) -> TpmIdentity | None:
        """A TPM version's identity (None for NVRAM); an encrypted state is opened with the
        VM's secret when the store holds it."""
        if blob.kind is not StateKind.TPM:
            return None
        identity = archive_identity(content)
        if identity.needs_secret:
            secret = await self._secrets.held(vm_id)
            if secret is not None:
                identity = archive_identity(content, secret.value.get_secret_value())
        if not identity.known:
            metrics.TPM_IDENTITY_UNREADABLE.inc()
            # Said when a VM's reason changes, not for each of its versions: a VM whose
            # state never parses would otherwise log a line per write (a tenth of the
            # store's CPU per version when every write is one).
            if self._unreadable.is_news(vm_id, identity.unknown_because):
                log.info("TPM identity not readable", vm_id=vm_id, reason=identity.unknown_because)
        else:
            self._unreadable.forget(vm_id)
        return identity

    async def _report(self, write: _PendingWrite, result: WriteResult, elapsed_s: float) -> None:
        """Metrics, a log line and the event each written version's outcome calls for."""
        vm_id, host, blob = write.vm_id, write.host, write.blob
        profile = None if write.identity is None else write.identity.profile
        metrics.PERSIST_SECONDS.observe(elapsed_s)
        metrics.PERSISTED.labels(kind=blob.kind.value, outcome=result.outcome.value).inc()
        if result.outcome is WriteOutcome.STORED:
            version = int(result.detail)
            log.debug(
                "state persisted",
                vm_id=vm_id,
                kind=blob.kind.value,
                version=version,
                content_hash=blob.content_hash[:12],
                epoch=blob.token.epoch,
            )
            await self._bus.publish_event(
                StatePersisted(
                    vm_id=vm_id,
                    kind=blob.kind,
                    content_hash=blob.content_hash,
                    size=blob.size,
                    token=blob.token,
                    version=version,
                    host=host,
                    tpm_profile=None if profile is None else profile.name,
                    state_format_level=None if profile is None else profile.state_format_level,
                ),
                subject=vm_id,
                # The version is durable already: failing here redelivers the whole event,
                # whose every stored change is then checked and announced again; under a
                # boot storm's load that retry was the larger part of the broker's backlog.
                attempts=PERSISTED_PUBLISH_ATTEMPTS,
            )
            await self._resets.after_write(vm_id, version, result.trust)
        elif result.outcome is WriteOutcome.STALE:
            # Replicas racing on the same VM: the newer write won. Not an audit matter.
            log.info("stale write ignored", vm_id=vm_id, kind=blob.kind.value, head=result.detail)
        elif result.outcome is not WriteOutcome.DUPLICATE:
            await self.refuse(vm_id, blob.kind, host, f"{result.outcome.value} ({result.detail})")
