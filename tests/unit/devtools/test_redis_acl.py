"""The generated Redis ACL users allow every command the services' scripts run, keep the
passwords out of the file, and leave nobody a way in without one."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest

from keeper_devtools.contract.redis_acl import (
    POLICY_COMMANDS,
    STORE_COMMANDS,
    MissingPasswordError,
    acl_file,
    users,
)

SERVICES = Path(__file__).resolve().parents[3] / "services"
# A command a Lua script runs: redis.call('HSET', ...) or redis.pcall("GET", ...).
_SCRIPT_COMMAND = re.compile(r"""redis\.p?call\(\s*['"]([A-Za-z]+)['"]""")

PASSWORDS = {user.password_variable: f"pw-{user.name}" for user in users()}


def _script_commands(source_root: Path) -> set[str]:
    """Every command named in a Lua script under ``source_root`` (files and strings)."""
    found: set[str] = set()
    for path in [*source_root.rglob("*.lua"), *source_root.rglob("*.py")]:
        text = path.read_text(encoding="utf-8")
        found |= {command.lower() for command in _SCRIPT_COMMAND.findall(text)}
    return found


@pytest.mark.parametrize(
    ("service", "allowed"),
    [("state-store", STORE_COMMANDS), ("policy", POLICY_COMMANDS)],
)
def test_every_command_a_script_runs_is_allowed(service: str, allowed: tuple[str, ...]) -> None:
    used = _script_commands(SERVICES / service / "src")
    assert used, f"no scripts found under {service}"
    assert used <= set(allowed), f"{service} scripts run {sorted(used - set(allowed))}"


def test_the_file_holds_password_hashes_only() -> None:
    text = acl_file(PASSWORDS)
    for password in PASSWORDS.values():
        assert password not in text
        assert f"#{hashlib.sha256(password.encode()).hexdigest()}" in text


def test_the_default_user_is_off_and_every_other_user_needs_its_password() -> None:
    lines = acl_file(PASSWORDS).splitlines()
    # Off with no password: unreachable; its permissions let Redis 7.0 replay the AOF.
    assert lines[0] == "user default off reset ~* &* +@all"
    for line in lines[1:]:
        assert " on #" in line
        assert "nopass" not in line


def test_no_service_user_may_flush_or_reconfigure() -> None:
    for commands in (STORE_COMMANDS, POLICY_COMMANDS):
        assert not {"flushall", "flushdb", "config|set", "keys", "acl", "shutdown"} & set(commands)


def test_a_missing_password_is_named() -> None:
    incomplete = dict(PASSWORDS)
    del incomplete["KEEPER_REDIS_POLICY_PASSWORD"]
    with pytest.raises(MissingPasswordError, match="KEEPER_REDIS_POLICY_PASSWORD"):
        acl_file(incomplete)
