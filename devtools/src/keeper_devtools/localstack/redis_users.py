"""The generated Redis ACL users (:mod:`keeper_devtools.contract.redis_acl`) with passwords
of their own, and the files a private Redis server reads them from, so no password is ever
on a command line.

In its directory (0700), every file 0600:

- ``<user>.password``: each user's password (``keeper-store.password``…), for the clients.
- ``users.acl``: the ACL file (``--aclfile``); it holds only the passwords' SHA-256.
- ``masterauth.conf``: ``masterauth <password>`` of the replication user, for a replica
  (``--include``, as ``deploy/redis/replicated.conf`` includes it).
- ``sentinels.password``: the Sentinels' own password (their ``requirepass``), which
  clients and the Sentinels among themselves log in with.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from keeper_devtools.contract.redis_acl import acl_file, users

ADMIN = "keeper-admin"
STORE = "keeper-store"
POLICY = "keeper-policy"
API = "keeper-api"
REPLICATION = "keeper-replication"
SENTINEL = "keeper-sentinel"


def _write_private(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".new")
    temporary.unlink(missing_ok=True)
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
    temporary.replace(path)


@dataclass(frozen=True)
class RedisUsers:
    """One set of users and passwords, kept in ``directory``."""

    directory: Path

    @classmethod
    def ensure(cls, directory: Path) -> RedisUsers:
        """The set in ``directory``; missing passwords are made (random, 32 bytes) and the
        ACL and replica files written again from all of them."""
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        made = cls(directory)
        environment: dict[str, str] = {}
        for user in users():
            path = made.password_file(user.name)
            if not path.is_file():
                _write_private(path, secrets.token_urlsafe(32))
            environment[user.password_variable] = made.password(user.name)
        if not made.sentinel_password_file.is_file():
            _write_private(made.sentinel_password_file, secrets.token_urlsafe(32))
        _write_private(made.acl_file, acl_file(environment))
        _write_private(made.masterauth_file, f"masterauth {made.password(REPLICATION)}\n")
        return made

    def password_file(self, user: str) -> Path:
        """The file holding ``user``'s password."""
        return self.directory / f"{user}.password"

    def password(self, user: str) -> str:
        """``user``'s password."""
        return self.password_file(user).read_text(encoding="utf-8").strip()

    def login(self, user: str) -> tuple[str, str]:
        """``(user, password)``."""
        return user, self.password(user)

    @property
    def sentinel_password_file(self) -> Path:
        """The file holding the Sentinels' password."""
        return self.directory / "sentinels.password"

    @property
    def sentinel_password(self) -> str:
        """The Sentinels' password."""
        return self.sentinel_password_file.read_text(encoding="utf-8").strip()

    @property
    def acl_file(self) -> Path:
        """The ACL file for ``aclfile``."""
        return self.directory / "users.acl"

    @property
    def masterauth_file(self) -> Path:
        """A config snippet with the replication user's password (``masteruser`` is
        `REPLICATION`), for a replica's include."""
        return self.directory / "masterauth.conf"
