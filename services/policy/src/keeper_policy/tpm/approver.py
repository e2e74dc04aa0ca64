"""``tpm.enable``: decide, record the decision as an event, register an approved VM."""

from __future__ import annotations

import structlog

from keeper_policy.gateway import Gateway
from keeper_policy.hosts.registry import HostRegistry
from keeper_policy.settings import PolicySettings
from keeper_policy.storage.vm_registry import PolicyRegistry
from keeper_policy.tpm.profile_choice import OLDEST_HOST
from keeper_policy.tpm.rules import ClusterView, Overrides, decide_tpm
from keeper_shared.messages.envelope import Envelope
from keeper_shared.messages.replies import EnableTpmReply
from keeper_shared.messages.tpm import EnableTpm, TpmApproved, TpmRejected

log = structlog.get_logger(__name__)


class Approver:
    """Carries out ``tpm.enable``."""

    def __init__(
        self,
        settings: PolicySettings,
        registry: PolicyRegistry,
        hosts: HostRegistry,
        gateway: Gateway,
    ) -> None:
        self._settings = settings
        self._registry = registry
        self._hosts = hosts
        self._gateway = gateway

    async def enable(self, envelope: Envelope[EnableTpm], user_id: str | None) -> EnableTpmReply:
        """Approve or reject; an approval registers the VM and names who overrode what."""
        # The broker-validated user if there is one: the envelope's source is the sender's
        # own claim.
        return await self.approve(envelope.data, user_id or envelope.source)

    async def approve(self, request: EnableTpm, requester: str) -> EnableTpmReply:
        """Approve or reject ``request``; ``requester`` is named when it overrode a rule."""
        spec = request.spec
        previous_name = await self._registry.registered_name(spec.vm_id)
        if not request.allow_duplicate_name:
            # Claimed before anything is decided: of two approvals of one name at once, on
            # any replicas, one gets it.
            holders = await self._registry.names.claim(spec.name, spec.vm_id, exclusive=True)
            if holders:
                log.info("TPM refused: duplicate name", vm_id=spec.vm_id)
                return EnableTpmReply.failed(_name_taken(spec.name, holders))
        live = await self._hosts.live_in_cluster(request.cluster, self._settings.host_lost_after_s)
        decision = decide_tpm(
            request.spec,
            rules=self._settings.guest_os_rules,
            aliases=self._settings.guest_os_aliases,
            cluster=ClusterView(request.cluster, live),
            overrides=Overrides(cluster=request.override, guest_os=request.override_guest_os),
            profile_setting=self._settings.tpm_profiles.get(request.cluster, OLDEST_HOST),
        )
        vm_id = request.spec.vm_id
        if decision.tpm_xml is None:
            if previous_name != spec.name:
                await self._registry.names.release(spec.name, vm_id)
            await self._gateway.publish(TpmRejected(vm_id=vm_id, reasons=decision.reasons), vm_id)
            log.info("TPM rejected", vm_id=vm_id, reasons=decision.reasons)
            return EnableTpmReply.failed("; ".join(decision.reasons))
        await self._registry.register_vm(request.spec, decision.tpm_xml)
        requested_by = requester if decision.overridden else None
        await self._gateway.publish(
            TpmApproved(
                vm_id=vm_id,
                tpm_xml=decision.tpm_xml,
                overridden=decision.overridden,
                override_requested_by=requested_by,
                guest_os_support=decision.guest_os_support,
                cluster=request.cluster,
            ),
            vm_id,
        )
        log.info(
            "TPM approved",
            vm_id=vm_id,
            overridden=decision.overridden,
            override_requested_by=requested_by,
        )
        return EnableTpmReply(
            ok=True,
            tpm_xml=decision.tpm_xml,
            guest_os_support=decision.guest_os_support,
            overridden=decision.overridden,
        )


def _name_taken(name: str, holders: list[str]) -> str:
    """Why ``name`` cannot be registered again."""
    return (
        f"a VM named {name!r} is registered already ({', '.join(holders)}): choose "
        "another name, or allow a second VM of that name (allow_duplicate_name, "
        "`keeper vm enable-tpm --allow-duplicate-name`)"
    )
