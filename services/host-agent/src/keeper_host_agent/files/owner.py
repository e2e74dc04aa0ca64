"""Which user and group the state files the agent writes belong to."""

from __future__ import annotations

import grp
import pwd


def resolve_owner(spec: str | None) -> tuple[int, int] | None:
    """`user:group` to numeric ids; None keeps the agent's own."""
    if spec is None:
        return None
    user, _, group = spec.partition(":")
    uid = pwd.getpwnam(user).pw_uid
    gid = grp.getgrnam(group).gr_gid if group else pwd.getpwnam(user).pw_gid
    return uid, gid
