"""Version numbers as people write them (`0.7.1`, `8.1`, `2012r2`, `0.10.0-rc1`), ordered.

Strings do not compare as versions (`"0.10" < "0.9"`), and swtpm's state format changes
between releases, so policy compares them here. Pure: no I/O.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import total_ordering

_VERSION_RE = re.compile(r"^v?(?P<numbers>\d+(?:\.\d+)*)(?:[-.~+]?(?P<suffix>[a-z][a-z0-9.]*))?$")
_PRE_RELEASE = ("dev", "alpha", "beta", "pre", "rc", "a", "b")
"""Suffixes that come before the release they name (`1.0-rc1 < 1.0`); any other suffix
(`2012r2`, `7.1sp1`) comes after it."""


class VersionError(ValueError):
    """Text that is not a version number."""


@dataclass(frozen=True)
@total_ordering
class Version:
    """A parsed version: numeric parts (trailing zeros ignored), then an optional suffix."""

    text: str
    numbers: tuple[int, ...]
    suffix: str

    def _key(self) -> tuple[tuple[int, ...], int, str]:
        numbers = list(self.numbers)
        while len(numbers) > 1 and numbers[-1] == 0:
            numbers.pop()
        if not self.suffix:
            rank = 1
        elif self.suffix.startswith(_PRE_RELEASE):
            rank = 0
        else:
            rank = 2
        return tuple(numbers), rank, self.suffix

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Version):
            return NotImplemented
        return self._key() == other._key()

    def __lt__(self, other: Version) -> bool:
        return self._key() < other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __str__(self) -> str:
        return self.text


def parse_version(text: str) -> Version:
    """Parse ``text``; VersionError when it is not a version number."""
    cleaned = text.strip().lower()
    match = _VERSION_RE.match(cleaned)
    if match is None:
        raise VersionError(f"not a version number: {text[:40]!r}")
    numbers = tuple(int(part) for part in match.group("numbers").split("."))
    return Version(text=text.strip(), numbers=numbers, suffix=match.group("suffix") or "")
