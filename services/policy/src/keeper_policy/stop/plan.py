"""The stop workflow as a state machine: which step comes next. Pure: no I/O.

Every trigger ends the same way: retrieve the final state (bounded attempts), make sure the
domain is off, fence (unplace: no host may write the VM's state any more), undefine and
wipe. They differ in how they begin:

- ``shutdown`` (from the manager): ask the guest to shut down first, so the state is
  retrieved after the VM is down; if the guest does not go down in time the state is
  retrieved while it runs and then it is powered off.
- ``poweroff``: retrieve while the VM still runs, then power it off.
- ``guest-shutdown``, ``crashed``, ``destroyed`` (reported by the host, no ``vm.stop``): the
  VM is already down; its state is still on the host until the domain is undefined.

The power-off step is idempotent (a stopped domain stays stopped), so it also guards the
event-triggered stops against a domain that is in fact still running.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from keeper_shared.messages.placement import StopTrigger


class StopStep(enum.StrEnum):
    """Where a stop workflow is."""

    SHUTDOWN = "shutdown"
    RETRIEVE = "retrieve"
    POWER_OFF = "power-off"
    FENCE = "fence"
    UNDEFINE = "undefine"
    DONE = "done"


@dataclass(frozen=True)
class StopBounds:
    """Time and attempt bounds of one stop (from the settings)."""

    retrieve_attempts: int
    retrieve_timeout_s: float
    host_command_timeout_s: float

    def total_s(self, trigger: StopTrigger) -> float:
        """How long the whole stop may take, at most: every step at its bound, plus slack
        for the Redis writes between them."""
        shutdown = self.host_command_timeout_s if trigger is StopTrigger.SHUTDOWN else 0.0
        retrieval = self.retrieve_attempts * self.retrieve_timeout_s
        return (shutdown + retrieval + 2 * self.host_command_timeout_s) * 1.2 + 5.0


def first_step(trigger: StopTrigger) -> StopStep:
    """Only a manager's shutdown asks the guest first; every other stop starts retrieving."""
    return StopStep.SHUTDOWN if trigger is StopTrigger.SHUTDOWN else StopStep.RETRIEVE


def may_retrieve(attempts_made: int, bounds: StopBounds, *, out_of_time: bool) -> bool:
    """Whether another retrieval attempt may start."""
    return attempts_made < bounds.retrieve_attempts and not out_of_time


def next_step(step: StopStep, *, ok: bool, may_retry: bool = False) -> StopStep:
    """The step after ``step`` ended (``ok`` or not). A failed retrieval is tried again while
    ``may_retry``; every other failure moves on, because nothing may block a stop."""
    if step is StopStep.RETRIEVE and not ok and may_retry:
        return StopStep.RETRIEVE
    order = list(StopStep)
    return order[min(order.index(step) + 1, len(order) - 1)]


def loss_recorded(step: StopStep, *, ok: bool, may_retry: bool) -> bool:
    """True when leaving ``step`` means the final state was not retrieved: the loss must be
    recorded before the destroy goes ahead."""
    return step is StopStep.RETRIEVE and not ok and not may_retry
