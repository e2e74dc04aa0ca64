"""The chaos verdicts can fail: the history check catches each way a store could go wrong."""

from __future__ import annotations

import pytest

from chaos.harness import check_chain
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
