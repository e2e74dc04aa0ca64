"""What the host agent does when told: fetch, prepare, start, shut down, power off, undefine."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable

import structlog

from keeper_host_agent.detect.state_tracker import StateTracker
from keeper_host_agent.files.owner import resolve_owner
from keeper_host_agent.files.state_cleanup import wipe_vm_state
from keeper_host_agent.files.state_writer import UnsafeStateWriteError, write_nvram, write_tpm_state
from keeper_host_agent.hypervisor.domain_xml import DomainXmlError, fill_nvram_path, parse_domain
from keeper_host_agent.hypervisor.errors import HypervisorError
from keeper_host_agent.hypervisor.port import Hypervisor
from keeper_host_agent.sealing_keys import HostSealingKeys
from keeper_host_agent.settings import HostAgentSettings
from keeper_shared.bus.client import Delivery
from keeper_shared.messages.commands import ReplyT
from keeper_shared.messages.envelope import Envelope
from keeper_shared.messages.replies import (
    PowerOffVmReply,
    PrepareVmReply,
    ShutdownVmReply,
    StartVmReply,
    UndefineVmReply,
)
from keeper_shared.messages.state import FetchState, SealedVmState, StateFetched
from keeper_shared.messages.types import StateBlob, StateKind, TpmSecret
from keeper_shared.messages.vm import PowerOffVm, PrepareVm, ShutdownVm, StartVm, UndefineVm
from keeper_shared.sealing.construction import SealingError
from keeper_shared.sealing.state_blobs import (
    open_state_blob,
    open_tpm_secret,
    seal_state_blob,
    seal_tpm_secret,
)
from keeper_shared.state_format.blobs import open_blob
from keeper_shared.state_format.compression import BlobFormatError
from keeper_shared.state_format.tpm_archive import unpack_tpm_state

log = structlog.get_logger(__name__)


def start_xml(xml: str, vm_id: str, epoch: int, settings: HostAgentSettings) -> str:
    """The domain XML policy sent for a start (or a revert), with the host's NVRAM path
    filled in; ``DomainXmlError`` when it is unusable or names another VM or epoch."""
    try:
        filled = fill_nvram_path(xml, settings.nvram_dir)
        domain = parse_domain(filled, swtpm_root=settings.swtpm_root, nvram_dir=settings.nvram_dir)
    except (DomainXmlError, SyntaxError) as error:
        raise DomainXmlError(f"unusable domain XML: {error}") from error
    if domain is None or domain.vm_id != vm_id or domain.epoch != epoch:
        raise DomainXmlError("domain XML does not match the VM id and epoch")
    return filled


class HostCommands:
    """Handlers of the VM commands: fetch, prepare, start, shutdown, power-off, undefine."""

    def __init__(
        self,
        settings: HostAgentSettings,
        hypervisor: Hypervisor,
        tracker: StateTracker,
        sealing: HostSealingKeys,
    ) -> None:
        self._settings = settings
        self._sealing = sealing
        self._hypervisor = hypervisor
        self._tracker = tracker
        self._owner = resolve_owner(settings.state_owner)

    async def fetch(self, envelope: Envelope[FetchState], _delivery: Delivery) -> StateFetched:
        """Reply with the current stable blobs of the requested VMs, sealed to the store."""
        request = envelope.data
        store = self._sealing.store
        found: list[SealedVmState] = []
        missing: list[str] = []
        for vm_id in request.vm_ids:
            if vm_id not in self._tracker.vms:
                missing.append(vm_id)
                continue
            blobs = []
            for kind in request.kinds:
                blob = await self._tracker.current_blob(vm_id, kind)
                if blob is not None:
                    blobs.append(seal_state_blob(vm_id, blob, store))
            secret = await self._foreign_secret(vm_id) if StateKind.TPM in request.kinds else None
            sealed_secret = seal_tpm_secret(vm_id, secret, store) if secret is not None else None
            found.append(SealedVmState(vm_id=vm_id, blobs=blobs, tpm_secret=sealed_secret))
        return StateFetched(vms=found, missing=missing)

    async def _foreign_secret(self, vm_id: str) -> TpmSecret | None:
        """The secret the VM's TPM state is encrypted with, when the keeper did not create
        it and libvirt reveals it: without it the state is useless elsewhere. An unreadable
        one is reported when the domain is discovered, not on every fetch."""
        secret_uuid = self._tracker.vms[vm_id].domain.tpm_secret_uuid
        if secret_uuid is None:
            return None
        try:
            return await self._hypervisor.read_foreign_secret(vm_id, secret_uuid)
        except HypervisorError as error:
            log.info("TPM secret not shipped", vm_id=vm_id, reason=str(error))
            return None

    async def prepare(self, envelope: Envelope[PrepareVm], _delivery: Delivery) -> PrepareVmReply:
        """Write the given state into place, verified, before the VM starts here."""
        request = envelope.data
        existing = await self._hypervisor.domain(request.vm_id)
        if existing is not None and existing.active:
            return PrepareVmReply.failed("VM is running on this host; refusing to overwrite")
        nvram_path = self._settings.nvram_dir / f"{request.name}_VARS.fd"
        tpm_hash = nvram_hash = secret_uuid = None
        try:
            # Verify everything before writing anything, so a bad NVRAM cannot leave a
            # half-prepared VM with a new TPM and an old NVRAM.
            tpm, nvram_blob, secret = self._open_prepared(request)
            tpm_files = unpack_tpm_state(open_blob(tpm)) if tpm else None
            nvram = open_blob(nvram_blob) if nvram_blob else None
            if secret is not None:
                # Before any file: when it fails nothing is written; a secret left behind
                # by a later failure is defined again (same UUID, same value) next time.
                defined = await self._hypervisor.define_tpm_secret(request.vm_id, secret)
                if not defined:
                    log.info(
                        "TPM secret already defined here by someone else; left as it is",
                        vm_id=request.vm_id,
                        tpm_secret_id=secret.uuid,
                    )
                secret_uuid = secret.uuid
            if tpm_files is not None:
                await asyncio.to_thread(
                    write_tpm_state,
                    self._settings.swtpm_root,
                    request.vm_id,
                    tpm_files,
                    self._owner,
                )
                tpm_hash = tpm.content_hash if tpm else None
            if nvram is not None:
                await asyncio.to_thread(write_nvram, nvram_path, nvram, self._owner)
                nvram_hash = nvram_blob.content_hash if nvram_blob else None
        except (
            BlobFormatError,
            UnsafeStateWriteError,
            ValueError,
            HypervisorError,
            SealingError,
        ) as error:
            log.warning("prepare refused", vm_id=request.vm_id, reason=str(error))
            return PrepareVmReply.failed(str(error))
        written = [
            kind
            for kind, digest in ((StateKind.TPM, tpm_hash), (StateKind.NVRAM, nvram_hash))
            if digest
        ]
        log.info("prepared", vm_id=request.vm_id, epoch=request.epoch, written=written)
        return PrepareVmReply(
            ok=True, tpm_hash=tpm_hash, nvram_hash=nvram_hash, tpm_secret_uuid=secret_uuid
        )

    def _open_prepared(
        self, request: PrepareVm
    ) -> tuple[StateBlob | None, StateBlob | None, TpmSecret | None]:
        """The TPM state, NVRAM and secret a prepare carries, opened with this host's keys
        and checked against its VM and epoch (`SealingError` when any does not open)."""
        keys, vm_id, epoch = self._sealing.own, request.vm_id, request.epoch
        return (
            open_state_blob(vm_id, request.tpm, keys, command_epoch=epoch) if request.tpm else None,
            (
                open_state_blob(vm_id, request.nvram, keys, command_epoch=epoch)
                if request.nvram
                else None
            ),
            (
                open_tpm_secret(vm_id, request.tpm_secret, keys, command_epoch=epoch)
                if request.tpm_secret
                else None
            ),
        )

    async def start(self, envelope: Envelope[StartVm], _delivery: Delivery) -> StartVmReply:
        """Define the domain from the given XML and start it."""
        request = envelope.data
        try:
            xml = start_xml(request.domain_xml, request.vm_id, request.epoch, self._settings)
        except DomainXmlError as error:
            return StartVmReply.failed(str(error))
        return await self._run(
            "start", request.vm_id, self._hypervisor.define_and_start(xml), StartVmReply
        )

    async def shutdown(
        self, envelope: Envelope[ShutdownVm], _delivery: Delivery
    ) -> ShutdownVmReply:
        """Ask the guest to shut down; reply when the domain is off."""
        request = envelope.data
        return await self._run(
            "shutdown",
            request.vm_id,
            self._hypervisor.shutdown(request.vm_id, request.timeout_s),
            ShutdownVmReply,
        )

    async def power_off(
        self, envelope: Envelope[PowerOffVm], _delivery: Delivery
    ) -> PowerOffVmReply:
        """Stop the domain at once."""
        return await self._run(
            "power-off",
            envelope.data.vm_id,
            self._hypervisor.power_off(envelope.data.vm_id),
            PowerOffVmReply,
        )

    async def undefine(
        self, envelope: Envelope[UndefineVm], _delivery: Delivery
    ) -> UndefineVmReply:
        """Remove the domain, and with ``wipe_state`` its local TPM and NVRAM."""
        request = envelope.data
        snapshot = await self._hypervisor.domain(request.vm_id)
        if snapshot is None:
            if request.wipe_state:
                # A prepare whose start never happened may have left the secret behind.
                await self._remove_secret(request.vm_id)
            return UndefineVmReply(ok=True, was_defined=False)
        location = parse_domain(
            snapshot.xml, swtpm_root=self._settings.swtpm_root, nvram_dir=self._settings.nvram_dir
        )
        result = await self._run(
            "undefine",
            request.vm_id,
            self._hypervisor.undefine(request.vm_id, keep_state=not request.wipe_state),
            UndefineVmReply,
        )
        if result.ok:
            self._tracker.untrack(request.vm_id)
            if request.wipe_state:
                removed = await asyncio.to_thread(
                    wipe_vm_state,
                    self._settings.swtpm_root,
                    request.vm_id,
                    location.nvram_path if location else None,
                )
                log.info("local state wiped", vm_id=request.vm_id, removed=len(removed))
                await self._remove_secret(request.vm_id)
            return UndefineVmReply(ok=True, was_defined=True)
        return result

    async def _remove_secret(self, vm_id: str) -> None:
        """Remove the keeper's TPM secret of a VM that left this host with its state; the
        store keeps the value. A failure is logged, not fatal: the domain is gone already,
        and the secret is redefined (same UUID, same value) if the VM comes back."""
        try:
            removed = await self._hypervisor.remove_tpm_secret(vm_id)
        except HypervisorError as error:
            log.warning("TPM secret not removed", vm_id=vm_id, reason=str(error))
            return
        if removed:
            log.info("TPM secret removed", vm_id=vm_id)

    async def _run(
        self, action: str, vm_id: str, operation: Awaitable[None], reply: type[ReplyT]
    ) -> ReplyT:
        try:
            await operation
        except HypervisorError as error:
            log.warning(f"{action} failed", vm_id=vm_id, reason=str(error))
            return reply.failed(str(error))
        log.info(f"{action} done", vm_id=vm_id)
        return reply(ok=True)
