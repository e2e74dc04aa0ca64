"""Bearer tokens: a file of ``NAME ROLE SHA256-HEX`` lines (``#`` starts a comment), so the
tokens themselves are never stored. ``python -m keeper_api.tokens NAME ROLE`` makes a
token, prints it once on stderr and the line for the file on stdout."""

from __future__ import annotations

import enum
import hashlib
import hmac
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path


class Role(enum.StrEnum):
    """``reader`` sees everything and changes nothing; ``operator`` may also change."""

    READER = "reader"
    OPERATOR = "operator"


@dataclass(frozen=True)
class Caller:
    """Who a valid token belongs to."""

    name: str
    role: Role


class TokenFileError(ValueError):
    """A line of the tokens file breaks the format; the message names it."""


def token_hash(token: str) -> str:
    """The hex SHA-256 the file keeps of ``token``."""
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class Tokens:
    """The callers by token hash."""

    by_hash: dict[str, Caller]

    @classmethod
    def load(cls, path: Path) -> Tokens:
        """Read the tokens file; a broken line is an error naming its number."""
        by_hash: dict[str, Caller] = {}
        for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            parts = line.split()
            if len(parts) != 3:
                raise TokenFileError(f"{path}:{number}: expected NAME ROLE SHA256-HEX")
            name, role, digest = parts
            if role not in Role.__members__.values():
                raise TokenFileError(f"{path}:{number}: role must be reader or operator")
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                raise TokenFileError(f"{path}:{number}: not a lower-case hex SHA-256")
            by_hash[digest] = Caller(name, Role(role))
        return cls(by_hash)

    def caller(self, token: str) -> Caller | None:
        """The caller ``token`` belongs to, or None. Compared in constant time per entry
        so a guess learns nothing from how long a refusal took."""
        digest = token_hash(token)
        found = None
        for known, caller in self.by_hash.items():
            if hmac.compare_digest(known, digest):
                found = caller
        return found


def main(argv: list[str]) -> int:
    """Make a token for ``NAME ROLE``."""
    if len(argv) != 2 or argv[1] not in Role.__members__.values():
        print("usage: python -m keeper_api.tokens NAME reader|operator", file=sys.stderr)
        return 2
    token = secrets.token_urlsafe(32)
    print(f"token (shown once): {token}", file=sys.stderr)
    print(f"{argv[0]} {argv[1]} {token_hash(token)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
