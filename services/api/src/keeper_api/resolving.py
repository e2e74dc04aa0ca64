"""A VM reference (id or name) to a VM id, refused the way the CLI refuses it."""

from __future__ import annotations

from keeper_api.problems import ProblemError
from keeper_shared.keeper_client import views
from keeper_shared.keeper_client.client import KeeperClient
from keeper_shared.keeper_client.outcomes import ExitCode


async def resolve(client: KeeperClient, reference: str) -> str:
    """The VM id ``reference`` names; unknown (404), a template (409), or ambiguous (422)."""
    matches = await views.resolve_vm(client, reference)
    if not matches:
        template = await views.template_named(client, reference)
        if template is not None:
            raise ProblemError(
                f"{reference!r} is a template, not a VM: create a VM from it", ExitCode.REFUSED
            )
        raise ProblemError(f"unknown VM {reference!r}", ExitCode.UNKNOWN_VM)
    if len(matches) > 1:
        raise ProblemError(
            f"{len(matches)} VMs are named {reference!r}: give the VM id ({', '.join(matches)})",
            ExitCode.USAGE,
        )
    return matches[0]


async def require_stopped(client: KeeperClient, reference: str, vm_id: str, then: str) -> None:
    """Refuse (409) while the VM runs, as the CLI's ``_refuse_while_running``."""
    status = await views.vm_status(client, vm_id)
    if status is not None and status.host is not None:
        raise ProblemError(
            f"{reference} runs on {status.host}: stop it first, then {then}", ExitCode.REFUSED
        )
