"""The agent's side of the libvirt QEMU hook: what it does when any VM manager starts or
stops a domain with a TPM or UEFI NVRAM on this host.

``prepare begin`` (before libvirt would run ``swtpm_setup``): ask policy to place the VM
here (a new epoch when it was placed elsewhere or nowhere), ask the store for its newest
state, verify it and write it into place, then reply. The hook runs while libvirt holds the
domain, so nothing here calls libvirt about that domain (it would wait for the hook to end):
the new epoch is stamped into the domain's metadata after the start, on its ``started``
event. An incoming live migration (announced by ``migrate begin``) is never restored over.

``release end`` (the domain stopped, swtpm is gone, the files are still there; a transient
domain's are deleted right after): have the store pull the final state, waiting a bounded
time, so a stop never hangs on the keeper.
"""

from __future__ import annotations

import asyncio
import time

import structlog

from keeper_host_agent.detect.state_tracker import StateTracker
from keeper_host_agent.files.owner import resolve_owner
from keeper_host_agent.files.state_writer import UnsafeStateWriteError, write_nvram, write_tpm_state
from keeper_host_agent.hook.decisions import (
    RestorePlan,
    plan_restore,
    refusal,
    restored_message,
    secret_problem,
)
from keeper_host_agent.hook.protocol import HookPhase, HookReply, HookRequest
from keeper_host_agent.hypervisor.domain_xml import (
    DomainStateLocation,
    DomainXmlError,
    parse_domain,
)
from keeper_host_agent.hypervisor.errors import HypervisorError
from keeper_host_agent.hypervisor.port import Hypervisor
from keeper_host_agent.sealing_keys import HostSealingKeys
from keeper_host_agent.settings import HostAgentSettings
from keeper_shared.bus.client import BusClient, CallError
from keeper_shared.bus.topology import POLICY, STATE_STORE
from keeper_shared.messages.envelope import MessageError
from keeper_shared.messages.host_requests import (
    ClaimOutcome,
    ClaimPlacement,
    NewestState,
    PlacementClaimed,
    ReadNewestState,
)
from keeper_shared.messages.replies import RetrieveStateReply
from keeper_shared.messages.state import RetrieveState
from keeper_shared.messages.types import StateKind
from keeper_shared.sealing.construction import SealingError
from keeper_shared.sealing.state_blobs import open_state_blob, open_tpm_secret
from keeper_shared.state_format.blobs import open_blob
from keeper_shared.state_format.compression import BlobFormatError
from keeper_shared.state_format.tpm_archive import MAIN_STATE_FILE_NAME, unpack_tpm_state

log = structlog.get_logger(__name__)


PLACING_FAILURES = (BlobFormatError, UnsafeStateWriteError, ValueError, OSError, HypervisorError)
"""A blob that does not open or verify, an unsafe tree, I/O, the secret refused."""


class StateNotPlacedError(Exception):
    """The stored state could not be put in place; the message says why."""


class HookHandler:
    """Answers the hook's requests; remembers the epochs to stamp after starts."""

    def __init__(
        self,
        settings: HostAgentSettings,
        bus: BusClient,
        hypervisor: Hypervisor,
        tracker: StateTracker,
        sealing: HostSealingKeys,
    ) -> None:
        self._settings = settings
        self._sealing = sealing
        self._bus = bus
        self._hypervisor = hypervisor
        self._tracker = tracker
        self._owner = resolve_owner(settings.state_owner)
        self._epochs_to_stamp: dict[str, int] = {}
        """VM id -> the placement epoch its domain gets once it runs."""
        self._incoming: dict[str, float] = {}
        """VM id -> until when (monotonic) its announced incoming migration is expected."""

    async def handle(self, request: HookRequest) -> HookReply:
        """One hook call; never raises (an unexpected error refuses the start)."""
        try:
            location = parse_domain(
                request.xml,
                swtpm_root=self._settings.swtpm_root,
                nvram_dir=self._settings.nvram_dir,
            )
        except DomainXmlError as error:
            return self._refuse(request.name, f"domain XML unusable: {error}")
        if location is None:
            return HookReply(ok=True, message="no TPM or NVRAM")
        try:
            if request.phase is HookPhase.MIGRATE_IN:
                deadline = time.monotonic() + self._settings.hook_migration_window_s
                self._incoming[location.vm_id] = deadline
                log.info("incoming migration announced", vm_id=location.vm_id)
                return HookReply(ok=True)
            if request.phase is HookPhase.PREPARE:
                return await self._prepare(location)
            return await self._release(location)
        except Exception as error:  # the hook must get an answer, whatever went wrong
            log.exception("hook request failed", vm_id=location.vm_id, phase=request.phase)
            return self._refuse(location.name, f"internal error: {type(error).__name__}")

    def epoch_to_stamp(self, vm_id: str) -> int | None:
        """The epoch a start by another manager placed the VM under, once: the agent writes
        it into the domain's metadata when the domain has started."""
        return self._epochs_to_stamp.pop(vm_id, None)

    def _refuse(self, name: str, reason: str) -> HookReply:
        reply = refusal(name, reason, fail_open=self._settings.hook_fail_open)
        if reply.ok:
            log.warning("start allowed by fail-open although", domain=name, reason=reason)
        else:
            log.warning("start refused", domain=name, reason=reason)
        return reply

    def _migrating_in(self, vm_id: str) -> bool:
        now = time.monotonic()
        for expired in [v for v, deadline in self._incoming.items() if deadline < now]:
            del self._incoming[expired]
        return self._incoming.pop(vm_id, None) is not None

    async def _prepare(self, location: DomainStateLocation) -> HookReply:
        vm_id, name = location.vm_id, location.name
        if self._migrating_in(vm_id):
            # The source's live state arrives with the migration; policy moves the
            # placement when both halves are reported.
            log.info("incoming migration: nothing restored", vm_id=vm_id)
            return HookReply(ok=True, message="incoming migration")
        began = time.monotonic()
        timeout = self._settings.hook_prepare_timeout_s
        try:
            claim = await self._bus.call(
                POLICY,
                ClaimPlacement(vm_id=vm_id, host=self._settings.host_id, name=name),
                PlacementClaimed,
                subject=vm_id,
                timeout_s=timeout,
                host_request=True,
            )
        except (CallError, MessageError) as error:
            return self._refuse(name, f"policy did not answer: {error}")
        outcome = claim.data.outcome
        if outcome is ClaimOutcome.UNREGISTERED:
            log.info("start of a VM the keeper does not protect", vm_id=vm_id, domain=name)
            return HookReply(ok=True, message="not protected by vTPM Keeper")
        if outcome is ClaimOutcome.REFUSED:
            return self._refuse(name, claim.data.reason or "policy refused the placement")
        epoch = claim.data.epoch
        try:
            newest = await self._bus.call(
                STATE_STORE,
                ReadNewestState(
                    vm_id=vm_id,
                    host=self._settings.host_id,
                    sealing_key=self._sealing.own.public.to_text(),
                ),
                NewestState,
                subject=vm_id,
                timeout_s=max(1.0, timeout - (time.monotonic() - began)),
                host_request=True,
            )
        except (CallError, MessageError) as error:
            return self._refuse(name, f"the state store did not answer: {error}")
        if newest.data.refused is not None:
            return self._refuse(name, newest.data.refused)
        local = await asyncio.to_thread(_local_kinds, location)
        plan = plan_restore(
            claim=outcome,
            wanted=_kinds_of(location),
            stored=newest.data.versions.keys(),
            local=local,
        )
        try:
            await self._put_in_place(location, plan, newest.data)
        except StateNotPlacedError as error:
            return self._refuse(name, str(error))
        if epoch != location.epoch:
            self._epochs_to_stamp[vm_id] = epoch
        message = restored_message(plan, newest.data.versions, epoch)
        log.info(
            "start prepared",
            vm_id=vm_id,
            domain=name,
            claim=outcome.value,
            previous_host=claim.data.previous_host,
            outcome=message,
            took_s=round(time.monotonic() - began, 3),
        )
        return HookReply(ok=True, message=message)

    async def _put_in_place(
        self, location: DomainStateLocation, plan: RestorePlan, newest: NewestState
    ) -> None:
        """Verify everything, then write: a bad NVRAM must not leave a new TPM behind."""
        restoring_tpm = StateKind.TPM in plan.write
        problem = secret_problem(
            domain_secret=location.tpm_secret_uuid,
            stored_secret=newest.tpm_secret.uuid if newest.tpm_secret else None,
            restoring_tpm=restoring_tpm,
        )
        if problem is not None:
            raise StateNotPlacedError(problem)
        keys, vm_id = self._sealing.own, location.vm_id
        try:
            tpm_files = (
                unpack_tpm_state(open_blob(open_state_blob(vm_id, newest.tpm, keys)))
                if restoring_tpm and newest.tpm
                else None
            )
            nvram = (
                open_blob(open_state_blob(vm_id, newest.nvram, keys))
                if StateKind.NVRAM in plan.write and newest.nvram
                else None
            )
            if tpm_files is not None and newest.tpm_secret is not None:
                # The secret API does not touch the domain libvirt holds for the hook.
                secret = open_tpm_secret(vm_id, newest.tpm_secret, keys)
                await self._hypervisor.define_tpm_secret(location.vm_id, secret)
            if tpm_files is not None:
                await asyncio.to_thread(
                    write_tpm_state,
                    self._settings.swtpm_root,
                    location.vm_id,
                    tpm_files,
                    self._owner,
                )
            if nvram is not None and location.nvram_path is not None:
                await asyncio.to_thread(write_nvram, location.nvram_path, nvram, self._owner)
        except (
            BlobFormatError,
            UnsafeStateWriteError,
            ValueError,
            OSError,
            HypervisorError,
            SealingError,
        ) as error:
            raise StateNotPlacedError(f"stored state could not be put in place: {error}") from None

    async def _release(self, location: DomainStateLocation) -> HookReply:
        vm_id = location.vm_id
        self._epochs_to_stamp.pop(vm_id, None)
        if location.epoch == 0:
            return HookReply(ok=True, message="not placed by vTPM Keeper")
        if vm_id not in self._tracker.vms:
            # The store's pull reads through the tracker; the files are still here.
            self._tracker.track(location)
        began = time.monotonic()
        try:
            reply = await self._bus.call(
                STATE_STORE,
                RetrieveState(vm_id=vm_id, host=self._settings.host_id),
                RetrieveStateReply,
                subject=vm_id,
                timeout_s=self._settings.hook_stop_timeout_s,
                host_request=True,
            )
        except (CallError, MessageError) as error:
            log.warning("final state not handed over", vm_id=vm_id, reason=str(error))
            return HookReply(ok=True, message=f"final state not stored: {error}")
        took = round(time.monotonic() - began, 3)
        if not reply.data.ok:
            log.warning("final state not stored", vm_id=vm_id, reason=reply.data.error, took_s=took)
            return HookReply(ok=True, message=f"final state not stored: {reply.data.error}")
        log.info("final state stored", vm_id=vm_id, versions=reply.data.versions, took_s=took)
        return HookReply(ok=True, message="final state stored")


def _kinds_of(location: DomainStateLocation) -> set[StateKind]:
    kinds = set()
    if location.tpm_dir is not None:
        kinds.add(StateKind.TPM)
    if location.nvram_path is not None:
        kinds.add(StateKind.NVRAM)
    return kinds


def _local_kinds(location: DomainStateLocation) -> set[StateKind]:
    """The kinds whose state is on this host now (a TPM counts only with its permall)."""
    local = set()
    if location.tpm_dir is not None and (location.tpm_dir / MAIN_STATE_FILE_NAME).is_file():
        local.add(StateKind.TPM)
    if location.nvram_path is not None and location.nvram_path.is_file():
        local.add(StateKind.NVRAM)
    return local
