"""Handlers of the queries policy answers on its commands queue."""

from __future__ import annotations

import time

from keeper_policy.adoption.records import DiscoveredDomains
from keeper_policy.hosts.registry import HostRegistry
from keeper_policy.storage.vm_registry import PolicyRegistry
from keeper_policy.views.host_views import host_view
from keeper_policy.views.vm_views import read_vm_views, registered_vm_ids, vms_named
from keeper_shared.bus.client import Delivery, Route
from keeper_shared.messages.adoption import ListUnprotectedVms, UnprotectedVmsListed
from keeper_shared.messages.envelope import Envelope
from keeper_shared.messages.queries import HostsListed, ListHosts, ListVms, VmsListed


class PolicyQueries:
    """Read-only views of policy's VMs and hosts."""

    def __init__(
        self, registry: PolicyRegistry, hosts: HostRegistry, *, lost_after_s: float
    ) -> None:
        self._redis = registry.redis
        self._hosts = hosts
        self._lost_after_s = lost_after_s
        self._discovered = DiscoveredDomains(registry.redis)

    def command_routes(self) -> list[Route]:
        """Routes of the queries on policy's commands queue."""
        return [
            Route(ListVms, self.on_list_vms),
            Route(ListHosts, self.on_list_hosts),
            Route(ListUnprotectedVms, self.on_list_unprotected),
        ]

    async def on_list_vms(self, envelope: Envelope[ListVms], delivery: Delivery) -> VmsListed:
        """Every registered VM, or those the request's reference names."""
        reference = envelope.data.vm
        if reference is not None:
            return VmsListed(vms=await vms_named(self._redis, reference))
        return VmsListed(vms=await read_vm_views(self._redis, await registered_vm_ids(self._redis)))

    async def on_list_hosts(self, envelope: Envelope[ListHosts], delivery: Delivery) -> HostsListed:
        """Every host that ever sent a heartbeat, with its liveness now."""
        now = time.time()
        records = sorted(await self._hosts.hosts(), key=lambda record: record.host)
        return HostsListed(
            lost_after_s=self._lost_after_s,
            hosts=[host_view(record, now, self._lost_after_s) for record in records],
        )

    async def on_list_unprotected(
        self, envelope: Envelope[ListUnprotectedVms], delivery: Delivery
    ) -> UnprotectedVmsListed:
        """Every TPM/UEFI domain a host reported that is not adopted, with the reasons."""
        return UnprotectedVmsListed(vms=[record.view() for record in await self._discovered.all()])
