"""What the agent decides for a start by another VM manager, without I/O: which state goes
into place, when a stored secret cannot work, and how a refusal reads (closed or open)."""

from __future__ import annotations

import pytest

from keeper_host_agent.hook.decisions import (
    RestorePlan,
    plan_restore,
    refusal,
    restored_message,
    secret_problem,
)
from keeper_shared.messages.host_requests import ClaimOutcome
from keeper_shared.messages.types import StateKind

TPM, NVRAM = StateKind.TPM, StateKind.NVRAM
BOTH = {TPM, NVRAM}
SECRET_A = "11111111-1111-1111-1111-111111111111"
SECRET_B = "22222222-2222-2222-2222-222222222222"


def test_a_new_vm_gets_nothing_written() -> None:
    plan = plan_restore(claim=ClaimOutcome.MOVED, wanted=BOTH, stored=set(), local=set())
    assert plan == RestorePlan(write=frozenset(), keep=frozenset())


@pytest.mark.parametrize("local", [set(), {TPM}, BOTH])
def test_a_vm_placed_here_now_gets_the_stored_state_over_whatever_is_local(
    local: set[StateKind],
) -> None:
    """Local files of a VM that was placed elsewhere (or nowhere) are stale."""
    plan = plan_restore(claim=ClaimOutcome.MOVED, wanted=BOTH, stored=BOTH, local=local)
    assert plan.write == BOTH
    assert plan.keep == frozenset()


def test_a_vm_that_stayed_here_keeps_its_own_files_and_gets_back_those_that_are_gone() -> None:
    """The store only ever got this VM's state from this host: a file still here is at
    least as new; one wiped (a new disk, undefine --tpm) comes back from the store."""
    plan = plan_restore(claim=ClaimOutcome.KEPT, wanted=BOTH, stored=BOTH, local={NVRAM})
    assert plan.write == {TPM}
    assert plan.keep == {NVRAM}


def test_only_the_kinds_the_domain_has_are_written() -> None:
    plan = plan_restore(claim=ClaimOutcome.MOVED, wanted={TPM}, stored=BOTH, local=set())
    assert plan.write == {TPM}


def problem(domain: str | None, stored: str | None, *, restoring_tpm: bool = True) -> str:
    found = secret_problem(domain_secret=domain, stored_secret=stored, restoring_tpm=restoring_tpm)
    return str(found)


def test_a_stored_secret_must_be_the_one_the_domain_names() -> None:
    assert problem(SECRET_A, SECRET_A) == "None"
    assert problem(SECRET_A, None) == "None"  # the manager defines its own secret
    assert "names no <encryption secret>" in problem(None, SECRET_A)
    assert SECRET_A in problem(SECRET_B, SECRET_A)
    assert SECRET_B in problem(SECRET_B, SECRET_A)
    assert problem(None, SECRET_A, restoring_tpm=False) == "None"


def test_a_refusal_stops_the_start_unless_fail_open() -> None:
    closed = refusal("vm1", "the state store did not answer", fail_open=False)
    assert not closed.ok
    assert closed.message == "vTPM Keeper refused to start vm1: the state store did not answer"
    opened = refusal("vm1", "the state store did not answer", fail_open=True)
    assert opened.ok
    assert "fail-open" in opened.message
    assert "the state store did not answer" in opened.message


def test_the_reply_says_what_was_restored_and_kept() -> None:
    plan = RestorePlan(write=frozenset({TPM}), keep=frozenset({NVRAM}))
    assert restored_message(plan, {TPM: 3, NVRAM: 5}, 4) == (
        "tpm v3 restored, nvram kept (this host's own); placement epoch 4"
    )
    assert restored_message(RestorePlan(frozenset(), frozenset()), {}, 1) == (
        "nothing stored yet; placement epoch 1"
    )
