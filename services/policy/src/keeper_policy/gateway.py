"""Bounded commands from policy to hosts and the store. Every call has a timeout and turns
every failure (no reply, no route, a refusal) into the command's own reply saying why (and
whether it timed out), so a workflow step always ends and decides what to do next."""

from __future__ import annotations

import structlog

from keeper_shared.bus.client import BusClient, CallError, CallTimeoutError
from keeper_shared.bus.topology import STATE_STORE, host_command_key
from keeper_shared.messages.commands import ReplyT
from keeper_shared.messages.envelope import MessageError, Payload
from keeper_shared.messages.replies import (
    PowerOffVmReply,
    RetrieveStateReply,
    ShutdownVmReply,
    UndefineVmReply,
)
from keeper_shared.messages.state import RetrieveState
from keeper_shared.messages.vm import PowerOffVm, ShutdownVm, UndefineVm

log = structlog.get_logger(__name__)


class Gateway:
    """Policy's outgoing commands and events."""

    def __init__(
        self, bus: BusClient, *, retrieve_timeout_s: float, host_command_timeout_s: float
    ) -> None:
        self._bus = bus
        self.retrieve_timeout_s = retrieve_timeout_s
        self.host_timeout_s = host_command_timeout_s

    async def call(
        self,
        target: str,
        payload: Payload,
        reply_type: type[ReplyT],
        vm_id: str,
        timeout_s: float,
    ) -> ReplyT:
        """Send a command and wait for its reply; failures become a failed one too."""
        try:
            reply = await self._bus.call(
                target, payload, reply_type, subject=vm_id, timeout_s=timeout_s
            )
        except CallTimeoutError as error:
            # The target may still act on it (until the command's deadline): say so.
            return reply_type.failed(str(error), timed_out=True)
        except (CallError, MessageError) as error:
            return reply_type.failed(str(error))
        return reply.data

    async def host(
        self,
        host: str,
        payload: Payload,
        reply_type: type[ReplyT],
        vm_id: str,
        timeout_s: float | None = None,
    ) -> ReplyT:
        """A command to one host, bounded by the host command timeout unless told."""
        return await self.call(
            host_command_key(host), payload, reply_type, vm_id, timeout_s or self.host_timeout_s
        )

    async def retrieve(self, vm_id: str, host: str) -> RetrieveStateReply:
        """One attempt at having the store pull and persist the VM's current state."""
        return await self.call(
            STATE_STORE,
            RetrieveState(vm_id=vm_id, host=host),
            RetrieveStateReply,
            vm_id,
            self.retrieve_timeout_s,
        )

    async def shutdown(self, vm_id: str, host: str) -> ShutdownVmReply:
        """Ask the guest to shut down; the host answers once the domain is off."""
        # The host gives up a little before we do, so its "did not shut down" reaches us.
        request = ShutdownVm(vm_id=vm_id, timeout_s=max(1.0, self.host_timeout_s * 0.8))
        return await self.host(host, request, ShutdownVmReply, vm_id)

    async def power_off(self, vm_id: str, host: str) -> PowerOffVmReply:
        """Stop the domain at once (a no-op when it is already off)."""
        return await self.host(host, PowerOffVm(vm_id=vm_id), PowerOffVmReply, vm_id)

    async def undefine(self, vm_id: str, host: str) -> UndefineVmReply:
        """Remove the domain and wipe its local TPM and NVRAM (a no-op when not defined)."""
        request = UndefineVm(vm_id=vm_id, wipe_state=True)
        return await self.host(host, request, UndefineVmReply, vm_id)

    async def evict(self, vm_id: str, host: str) -> UndefineVmReply:
        """Remove a VM the host must no longer hold: off, undefined, wiped, nothing
        retrieved. The power-off may fail on a domain that is already gone; the undefine
        decides."""
        off = await self.power_off(vm_id, host)
        if not off.ok:
            log.info("power-off before eviction failed", vm_id=vm_id, host=host, reason=off.error)
        return await self.undefine(vm_id, host)

    async def publish(self, payload: Payload, subject: str) -> None:
        """Publish a fact (waits for the broker's confirm)."""
        await self._bus.publish_event(payload, subject=subject)
