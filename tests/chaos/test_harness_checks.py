"""The chaos verdicts can fail: the history check catches each way a store could go wrong."""

from __future__ import annotations

import pytest

from chaos.faults import FaultKind, InjectedFault
from chaos.harness import StoredVersion, Write, check_chain
from chaos.verdict import at_kill, classify, store_writable_since
from keeper_shared.messages.types import FencingToken

pytestmark = [pytest.mark.chaos]

ORDER = {"a": 0, "b": 1, "c": 2}
"""Contents a, b, c written by the load in that order."""


def token(epoch: int, generation: int) -> FencingToken:
    return FencingToken(epoch=epoch, generation=generation)


def problems(chain: list[tuple[int, str, FencingToken]]) -> list[str]:
    found: list[str] = []
    check_chain("vm", chain, ORDER, "stored", found)
    return found


def test_a_sound_history_passes() -> None:
    # Skipped contents are fine (not every change is stable long enough to be stored), and a
    # new epoch orders after any generation of the old one.
    assert problems([(1, "a", token(1, 5)), (2, "c", token(2, 1))]) == []


@pytest.mark.parametrize(
    ("chain", "expected"),
    [
        ([(1, "b", token(1, 5)), (2, "a", token(1, 6))], "older over newer"),
        ([(1, "a", token(1, 5)), (2, "b", token(1, 5))], "is not newer"),
        ([(1, "a", token(2, 1)), (2, "b", token(1, 9))], "is not newer"),
        ([(1, "a", token(1, 5)), (2, "a", token(1, 6))], "repeats"),
        ([(1, "a", token(1, 5)), (1, "b", token(1, 6))], "twice"),
        ([(1, "torn", token(1, 5))], "never wrote"),
    ],
)
def test_each_fault_is_caught(chain: list[tuple[int, str, FencingToken]], expected: str) -> None:
    assert any(expected in problem for problem in problems(chain)), problems(chain)


WRITES = [Write("a", 10.0), Write("b", 20.0), Write("c", 30.0), Write("d", 50.0)]
"""Contents a-d written at these times; the agent is killed at 40 and back at 45."""


def stored(*versions: tuple[str, float]) -> list[StoredVersion]:
    return [
        StoredVersion(i + 1, digest, token(1, i + 1), at) for i, (digest, at) in enumerate(versions)
    ]


def test_the_content_current_at_a_kill_stored_before_the_agent_came_back_is_saved() -> None:
    judged = at_kill(WRITES, stored(("a", 11.0), ("c", 31.0)), killed_at=40.0, back_at=45.0)
    assert judged is not None
    assert (judged.stable_s, judged.saved, judged.recovery_point_s) == (10.0, True, 0.0)


def test_content_stored_only_after_the_agent_came_back_was_not_saved_before_the_kill() -> None:
    judged = at_kill(WRITES, stored(("a", 11.0), ("c", 46.0)), killed_at=40.0, back_at=45.0)
    assert judged is not None
    assert not judged.saved
    assert judged.recovery_point_s == 20.0  # b (written at 20) was the first change lost


def test_stable_time_counts_from_when_the_store_could_write_again() -> None:
    # c was written at 30, but Redis could make no write durable until 37: at a kill at 40
    # it has been storable for 3 s, not 10.
    judged = at_kill(WRITES, stored(("a", 11.0)), killed_at=40.0, back_at=45.0, writable_since=37.0)
    assert judged is not None
    assert judged.stable_s == 3.0
    # An outage over before the last write changes nothing.
    earlier = at_kill(
        WRITES, stored(("a", 11.0)), killed_at=40.0, back_at=45.0, writable_since=25.0
    )
    assert earlier is not None
    assert earlier.stable_s == 10.0


def test_the_recovery_point_is_also_counted_from_when_the_store_could_write_again() -> None:
    # b (written at 20) was the first change lost; no write was possible until 37.
    judged = at_kill(WRITES, stored(("a", 11.0)), killed_at=40.0, back_at=45.0, writable_since=37.0)
    assert judged is not None
    assert (judged.recovery_point_s, judged.since_writable_s) == (20.0, 3.0)
    # An outage over before the first lost change changes nothing.
    earlier = at_kill(
        WRITES, stored(("a", 11.0)), killed_at=40.0, back_at=45.0, writable_since=15.0
    )
    assert earlier is not None
    assert earlier.since_writable_s == 20.0


def test_the_store_can_write_again_after_outages_and_the_killed_hosts_own_cut_off() -> None:
    kill = InjectedFault(FaultKind.HOST_KILL, "host-a", at=40.0, back_at=45.0)
    faults = [
        InjectedFault(FaultKind.REDIS_RESTART, "redis", at=10.0, back_at=11.0, recovery_s=2.0),
        InjectedFault(FaultKind.HOST_CUT, "host-a", at=20.0, back_at=25.0),
        InjectedFault(FaultKind.HOST_CUT, "host-b", at=30.0, back_at=33.0),  # another host
        InjectedFault(FaultKind.STORE_KILL, "store-1", at=34.0, back_at=35.0),  # others write
        InjectedFault(FaultKind.BROKER_RESTART, "rabbitmq", at=41.0, back_at=42.0),  # later
        kill,
    ]
    assert store_writable_since(kill, faults) == 25.0
    assert store_writable_since(kill, faults[:1]) == 12.0
    assert store_writable_since(kill, []) == 0.0


def test_nothing_written_before_a_kill_is_not_judged() -> None:
    assert at_kill(WRITES, [], killed_at=5.0, back_at=6.0) is None


def test_problems_are_told_apart() -> None:
    found = problems([(1, "b", token(1, 5)), (2, "a", token(1, 6)), (3, "a", token(1, 7))])
    stale, double, other = classify([*found, "vm: nothing stored"])
    assert stale
    assert double
    assert other == ["vm: nothing stored"]
