"""What was last said about each VM, so a lasting condition is logged when it changes, not
for every version that still has it."""

from __future__ import annotations

from collections import OrderedDict


class ReasonsSaid:
    """The reason last said per key, for the ``capacity`` most recent keys (older ones are
    forgotten, and said again if they come back: the memory stays bounded on a large
    fleet)."""

    def __init__(self, capacity: int = 10_000) -> None:
        self._capacity = capacity
        self._said: OrderedDict[str, str | None] = OrderedDict()

    def is_news(self, key: str, reason: str | None) -> bool:
        """Remember ``reason`` for ``key``; True unless it is what was said last for it."""
        news = self._said.get(key, _NOTHING) != reason
        self._said[key] = reason
        self._said.move_to_end(key)
        if len(self._said) > self._capacity:
            self._said.popitem(last=False)
        return news

    def forget(self, key: str) -> None:
        """The condition ended: the next time it holds is news again."""
        self._said.pop(key, None)


_NOTHING = object()
