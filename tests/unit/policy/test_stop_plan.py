"""The stop workflow's state machine: each trigger's path, the bounded retrieval, and the
loss recorded exactly when the final state could not be retrieved."""

from __future__ import annotations

import pytest

from keeper_policy.stop.plan import (
    StopBounds,
    StopStep,
    first_step,
    loss_recorded,
    may_retrieve,
    next_step,
)
from keeper_shared.messages.placement import StopTrigger

BOUNDS = StopBounds(retrieve_attempts=3, retrieve_timeout_s=15.0, host_command_timeout_s=60.0)


def walk(
    trigger: StopTrigger,
    results: dict[StopStep, list[bool]],
    *,
    out_of_time_after: int | None = None,
) -> tuple[list[StopStep], bool, int]:
    """Run the machine with the given outcome per step (consumed in order, True when a step
    has no more listed); returns the steps taken, whether a loss was recorded, attempts."""
    steps: list[StopStep] = []
    step = first_step(trigger)
    attempts = 0
    lost = False
    for _ in range(50):  # the machine must end: it never loops without a bound
        if step is StopStep.DONE:
            return steps, lost, attempts
        steps.append(step)
        queued = results.get(step, [])
        ok = queued.pop(0) if queued else True
        retry = False
        if step is StopStep.RETRIEVE:
            attempts += 1
            out_of_time = out_of_time_after is not None and attempts >= out_of_time_after
            retry = may_retrieve(attempts, BOUNDS, out_of_time=out_of_time)
            lost = lost or loss_recorded(step, ok=ok, may_retry=retry)
        step = next_step(step, ok=ok, may_retry=retry)
    pytest.fail("the stop workflow did not end")


AFTER_RETRIEVAL = [StopStep.POWER_OFF, StopStep.FENCE, StopStep.UNDEFINE]


@pytest.mark.parametrize(
    ("trigger", "path"),
    [
        (StopTrigger.SHUTDOWN, [StopStep.SHUTDOWN, StopStep.RETRIEVE, *AFTER_RETRIEVAL]),
        (StopTrigger.POWEROFF, [StopStep.RETRIEVE, *AFTER_RETRIEVAL]),
        (StopTrigger.GUEST_SHUTDOWN, [StopStep.RETRIEVE, *AFTER_RETRIEVAL]),
        (StopTrigger.CRASHED, [StopStep.RETRIEVE, *AFTER_RETRIEVAL]),
        (StopTrigger.DESTROYED, [StopStep.RETRIEVE, *AFTER_RETRIEVAL]),
    ],
)
def test_each_trigger_retrieves_before_the_domain_goes(
    trigger: StopTrigger, path: list[StopStep]
) -> None:
    steps, lost, attempts = walk(trigger, {})
    assert steps == path
    assert (lost, attempts) == (False, 1)
    # Retrieval always comes before fencing and undefining; only a manager's shutdown
    # waits for the guest first.
    assert steps.index(StopStep.RETRIEVE) < steps.index(StopStep.UNDEFINE)


def test_poweroff_retrieves_while_running_then_destroys() -> None:
    steps, _, _ = walk(StopTrigger.POWEROFF, {})
    assert steps.index(StopStep.RETRIEVE) < steps.index(StopStep.POWER_OFF)


def test_retrieval_is_tried_three_times_then_the_destroy_goes_ahead_with_the_loss() -> None:
    steps, lost, attempts = walk(StopTrigger.POWEROFF, {StopStep.RETRIEVE: [False] * 10})
    assert steps == [StopStep.RETRIEVE] * 3 + AFTER_RETRIEVAL
    assert (lost, attempts) == (True, 3)


def test_a_later_attempt_that_works_records_no_loss() -> None:
    steps, lost, attempts = walk(StopTrigger.CRASHED, {StopStep.RETRIEVE: [False, False, True]})
    assert steps == [StopStep.RETRIEVE] * 3 + AFTER_RETRIEVAL
    assert (lost, attempts) == (False, 3)


def test_running_out_of_time_stops_retrying() -> None:
    steps, lost, attempts = walk(
        StopTrigger.POWEROFF, {StopStep.RETRIEVE: [False] * 10}, out_of_time_after=1
    )
    assert steps == [StopStep.RETRIEVE, *AFTER_RETRIEVAL]
    assert (lost, attempts) == (True, 1)


def test_a_guest_that_will_not_shut_down_is_retrieved_running_then_powered_off() -> None:
    steps, lost, _ = walk(StopTrigger.SHUTDOWN, {StopStep.SHUTDOWN: [False]})
    assert steps == [StopStep.SHUTDOWN, StopStep.RETRIEVE, *AFTER_RETRIEVAL]
    assert not lost


@pytest.mark.parametrize("failing", [StopStep.POWER_OFF, StopStep.FENCE, StopStep.UNDEFINE])
def test_no_failure_blocks_a_stop(failing: StopStep) -> None:
    steps, _, _ = walk(StopTrigger.POWEROFF, {failing: [False] * 10})
    assert steps == [StopStep.RETRIEVE, *AFTER_RETRIEVAL]


def test_the_bound_covers_every_step() -> None:
    total = BOUNDS.total_s(StopTrigger.SHUTDOWN)
    assert total >= 60 + 3 * 15 + 2 * 60
    assert BOUNDS.total_s(StopTrigger.POWEROFF) < total  # no guest shutdown to wait for
