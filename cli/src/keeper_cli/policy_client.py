"""Requests to policy with every option of the message contract, and their full replies.

:class:`KeeperClient` keeps the simple calls (``enable_tpm``, ``start``, ``stop``); this adds
clusters and overrides, placement from chosen versions, and the whole reply of a stop
(retrieved, removed, trigger) for automation that needs to know how it went, and
snapshots (offline, live, with memory).
"""

from __future__ import annotations

from collections.abc import Sequence

from keeper_cli.client import KeeperClient
from keeper_shared.bus.client import BusClient
from keeper_shared.messages.placement import PlaceVm, StopMode, StopVm
from keeper_shared.messages.tpm import DEFAULT_CLUSTER, EnableTpm, VmSpec
from keeper_shared.messages.types import StateKind
from keeper_shared.messages.vm_snapshot import SnapshotVm


class PolicyClient(KeeperClient):
    """A :class:`KeeperClient` with the full policy requests."""

    @classmethod
    async def connect(
        cls, amqp_url: str | Sequence[str], *, name: str, request_timeout_s: float = 120.0
    ) -> PolicyClient:
        """Connect as a client named ``name`` (to one broker URL, or a cluster's nodes)."""
        bus = await BusClient.connect(amqp_url, source=f"client/{name}", origin="client")
        return cls(bus, request_timeout_s=request_timeout_s)

    async def request_tpm(
        self,
        spec: VmSpec,
        *,
        cluster: str = DEFAULT_CLUSTER,
        override: bool = False,
        override_guest_os: bool = False,
    ) -> dict[str, str]:
        """Register a VM with a TPM in ``cluster``; returns the approval's detail
        (``tpm_xml``, ``guest_os_support``, ``overridden``). Raises KeeperRequestError with
        every reason when rejected."""
        request = EnableTpm(
            spec=spec, cluster=cluster, override=override, override_guest_os=override_guest_os
        )
        return await self._ask_policy(request, spec.vm_id)

    async def place(
        self,
        vm_id: str,
        host: str,
        *,
        override_version: bool = False,
        versions: dict[StateKind, int] | None = None,
        snapshot_id: str | None = None,
        allow_older: bool = False,
    ) -> dict[str, str]:
        """Start a VM on ``host``; returns the detail (``epoch``, versions sent, and
        ``version_overridden`` when an older swtpm was allowed)."""
        request = PlaceVm(
            vm_id=vm_id,
            host=host,
            override_version=override_version,
            versions=versions,
            snapshot_id=snapshot_id,
            allow_older=allow_older,
        )
        return await self._ask_policy(request, vm_id)

    async def stop_vm(self, vm_id: str, mode: StopMode) -> dict[str, str]:
        """Stop a VM; returns how it went (``retrieved``, ``removed``, ``trigger``,
        ``attempts``), or a ``note`` when it ran nowhere."""
        return await self._ask_policy(StopVm(vm_id=vm_id, mode=mode), vm_id)

    async def snapshot(
        self, vm_id: str, snapshot_id: str, *, memory: bool = False
    ) -> dict[str, str]:
        """Snapshot a VM (with memory: paused while its TPM state is retrieved); returns the
        detail (``mode``, the pinned version per kind, ``persisted_age_s`` for a live one).
        Restore it with :meth:`place` and ``snapshot_id``."""
        request = SnapshotVm(vm_id=vm_id, snapshot_id=snapshot_id, memory=memory)
        return await self._ask_policy(request, vm_id)
