"""How often a long-running service's cyclic garbage collector walks its whole heap.

Almost everything a service frees goes by reference count; the cyclic collector is there for
the rest. CPython starts a full collection, which walks every tracked object, after every
tenth collection of the middle generation, once the objects promoted into the oldest
generation since the last full one reach a quarter of it. A state store draining a boot
storm holds up to a thousand events with their blobs; each batch's survivors are promoted
and then freed by reference count, which that quarter does not see. So full collections
came about twice a second, each walking the whole held heap (137 ms on average): in the
bench's scale run the store spent 26 s of its 172 s of CPU in 181 full collections. With
:data:`FULL_THRESHOLD` it spent about 3 s in 21, and the storm stored every newest state
in 61 s instead of 71 s (a storm whose simulator then announced about twice the versions
it meant to; docs/benchmarks.md has those of the storm as simulated now).
"""

from __future__ import annotations

import gc

YOUNG_THRESHOLD = 700
"""CPython's own: a young collection per 700 more tracked objects alive. Raising it (tried
at 10,000) made each young collection walk more of a batch still in use, and cost more in
all than it saved."""
MIDDLE_THRESHOLD = 10
"""CPython's own: a middle collection per 10 young ones."""
FULL_THRESHOLD = 100
"""Ten times CPython's 10: a full collection at most once per 100 middle collections, and
still only once the oldest generation has grown by a quarter. Cyclic garbage that reached
the oldest generation waits up to ten times as many allocations to be freed (seconds under
a storm's load; at rest a service allocates little, with either threshold). Nothing is
disabled, so no garbage waits for ever."""


def collect_whole_heap_less_often() -> None:
    """Set the collector's thresholds for a long-running service (before it starts)."""
    gc.set_threshold(YOUNG_THRESHOLD, MIDDLE_THRESHOLD, FULL_THRESHOLD)
