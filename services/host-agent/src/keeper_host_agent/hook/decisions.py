"""What the agent decides for a start by another VM manager: pure, no I/O.

Which kinds of state go into place: the newest stored version of each kind the domain has,
unless the VM stayed placed on this host and its file is here (then this host's own file is
the newest: the store only ever got it from here). A kind the store holds nothing of is left
to libvirt (a new TPM, a NVRAM copied from the template), as for a new VM.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from keeper_host_agent.hook.protocol import HookReply
from keeper_shared.messages.host_requests import ClaimOutcome
from keeper_shared.messages.types import StateKind


@dataclass(frozen=True)
class RestorePlan:
    """Per kind: write the stored version, or keep the local file."""

    write: frozenset[StateKind]
    keep: frozenset[StateKind]


def plan_restore(
    *,
    claim: ClaimOutcome,
    wanted: Collection[StateKind],
    stored: Collection[StateKind],
    local: Collection[StateKind],
) -> RestorePlan:
    """``wanted``: the kinds the domain has; ``stored``: those the store gave; ``local``:
    those whose file is on this host now."""
    write: set[StateKind] = set()
    keep: set[StateKind] = set()
    for kind in wanted:
        if kind not in stored:
            continue
        if claim is ClaimOutcome.KEPT and kind in local:
            keep.add(kind)
        else:
            write.add(kind)
    return RestorePlan(write=frozenset(write), keep=frozenset(keep))


def secret_problem(
    *, domain_secret: str | None, stored_secret: str | None, restoring_tpm: bool
) -> str | None:
    """Why the stored TPM state could not be read by swtpm in this domain, or None.

    A secret the store holds is the one the stored state is encrypted with: the domain's
    ``<encryption secret>`` must name it. A domain naming a secret the store does not hold
    gets it from its manager (Nova and oVirt define it before the start)."""
    if not restoring_tpm or stored_secret is None:
        return None
    if domain_secret is None:
        return (
            f"the stored TPM state is encrypted with libvirt secret {stored_secret}, but the "
            "domain's TPM names no <encryption secret>"
        )
    if domain_secret != stored_secret:
        return (
            f"the domain's TPM names secret {domain_secret}, but the stored state is "
            f"encrypted with secret {stored_secret}"
        )
    return None


def refusal(name: str, reason: str, *, fail_open: bool) -> HookReply:
    """The reply when the stored state cannot be put in place: refuse the start, or (fail
    open) let it go on with a message saying what was skipped."""
    if fail_open:
        return HookReply(ok=True, message=f"vTPM Keeper (fail-open) let {name} start: {reason}")
    return HookReply(ok=False, message=f"vTPM Keeper refused to start {name}: {reason}")


def restored_message(plan: RestorePlan, versions: dict[StateKind, int], epoch: int) -> str:
    """What a successful prepare says (in the agent's log and the hook's reply)."""
    parts = [f"{kind.value} v{versions[kind]} restored" for kind in sorted(plan.write)]
    parts += [f"{kind.value} kept (this host's own)" for kind in sorted(plan.keep)]
    if not parts:
        parts = ["nothing stored yet"]
    return f"{', '.join(parts)}; placement epoch {epoch}"
