"""A service's garbage collector is set for a long run before the service starts."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Iterator

import pytest

from keeper_shared.runtime.garbage_collection import FULL_THRESHOLD
from keeper_shared.runtime.service_runner import run_until_signalled


@pytest.fixture
def thresholds_restored() -> Iterator[None]:
    before = gc.get_threshold()
    yield
    gc.set_threshold(*before)


@pytest.mark.usefixtures("thresholds_restored")
def test_a_service_walks_its_whole_heap_less_often_but_never_stops_collecting() -> None:
    gc.set_threshold(700, 10, 10)
    seen: list[tuple[int, ...]] = []

    async def serve(stop: asyncio.Event) -> None:
        seen.append(gc.get_threshold())

    run_until_signalled(serve)

    (young, middle, full) = seen[0]
    assert (young, middle) == (700, 10)
    assert full == FULL_THRESHOLD > 10
    assert gc.isenabled()
