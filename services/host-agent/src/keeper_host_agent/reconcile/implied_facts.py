"""The lifecycle facts two readings of the host's domains imply. Pure: no I/O.

libvirt delivers no events while the agent is down or its connection to libvirtd is lost,
so after either the agent compares what it knew with what libvirt holds now and reports
the difference as the facts policy would have heard live. After its own restart it knew
nothing: a domain vTPM Keeper placed that is off now stopped while nobody watched (policy
decides from its placement whether that is news), and a running one says nothing new.
"""

from __future__ import annotations

from dataclasses import dataclass

from keeper_shared.messages.vm import StopReason


@dataclass(frozen=True)
class DomainPresence:
    """One TPM/UEFI domain as one reading saw it."""

    name: str
    placed: bool
    """It carries a placement epoch (vTPM Keeper placed it)."""
    active: bool
    shutoff_reason: StopReason | None = None


@dataclass(frozen=True)
class ImpliedFact:
    """A lifecycle fact to report for a domain: `stopped`, `undefined` or `started`."""

    vm_id: str
    name: str
    event: str
    stop_reason: StopReason | None = None


def implied_facts(
    before: dict[str, DomainPresence] | None, after: dict[str, DomainPresence]
) -> list[ImpliedFact]:
    """What happened between ``before`` (None: the agent knew nothing) and ``after``.
    Domains vTPM Keeper did not place are reported as discovered instead, except when one
    vanished (policy forgets it then)."""
    facts: list[ImpliedFact] = []
    for vm_id, now in sorted(after.items()):
        then = before.get(vm_id) if before is not None else None
        if not now.placed:
            continue
        if not now.active and (before is None or then is None or then.active):
            reason = now.shutoff_reason or StopReason.UNKNOWN
            facts.append(ImpliedFact(vm_id, now.name, "stopped", reason))
        elif now.active and before is not None and (then is None or not then.active):
            facts.append(ImpliedFact(vm_id, now.name, "started"))
    for vm_id, then in sorted((before or {}).items()):
        if vm_id in after:
            continue
        if then.active and then.placed:
            facts.append(ImpliedFact(vm_id, then.name, "stopped", StopReason.UNKNOWN))
        facts.append(ImpliedFact(vm_id, then.name, "undefined"))
    return facts
