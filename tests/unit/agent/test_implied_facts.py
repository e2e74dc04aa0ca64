"""Which lifecycle facts two readings of a host's domains imply (pure)."""

from __future__ import annotations

from keeper_host_agent.reconcile.implied_facts import DomainPresence, ImpliedFact, implied_facts
from keeper_shared.messages.vm import StopReason

RUNNING = DomainPresence("web", placed=True, active=True)
OFF = DomainPresence("web", placed=True, active=False, shutoff_reason=StopReason.SHUTDOWN)


def test_after_a_restart_a_placed_domain_found_off_stopped_meanwhile() -> None:
    found_off = DomainPresence("web", placed=True, active=False, shutoff_reason=None)
    assert implied_facts(None, {"a": found_off, "b": RUNNING}) == [
        ImpliedFact("a", "web", "stopped", StopReason.UNKNOWN)
    ]


def test_after_a_restart_nothing_is_said_of_running_or_unplaced_domains() -> None:
    unplaced_off = DomainPresence("other", placed=False, active=False)
    assert implied_facts(None, {"a": RUNNING, "b": unplaced_off}) == []


def test_a_reconnect_reports_stops_starts_and_vanished_domains() -> None:
    before = {"stops": RUNNING, "starts": OFF, "goes": RUNNING, "stays": RUNNING}
    after = {"stops": OFF, "starts": RUNNING, "stays": RUNNING, "new": RUNNING}
    assert implied_facts(before, after) == [
        ImpliedFact("new", "web", "started"),
        ImpliedFact("starts", "web", "started"),
        ImpliedFact("stops", "web", "stopped", StopReason.SHUTDOWN),
        ImpliedFact("goes", "web", "stopped", StopReason.UNKNOWN),
        ImpliedFact("goes", "web", "undefined"),
    ]


def test_a_domain_off_before_and_after_says_nothing_again() -> None:
    assert implied_facts({"a": OFF}, {"a": OFF}) == []


def test_an_unplaced_domain_that_vanished_is_only_undefined() -> None:
    unplaced = DomainPresence("other", placed=False, active=True)
    assert implied_facts({"a": unplaced}, {}) == [ImpliedFact("a", "other", "undefined")]
