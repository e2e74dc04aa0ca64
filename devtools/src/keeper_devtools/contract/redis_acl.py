"""Redis ACL users generated from the key names and commands the services use, so each
service reaches only its own keys with only its own commands.

``python -m keeper_devtools.contract.redis_acl > /etc/redis/users.acl`` prints a Redis ACL
file (``aclfile`` in ``deploy/redis/redis.conf``):

- ``keeper-store``: the state store. Its keys of every VM (state, data key, TPM secret,
  snapshots, scrub lock) and the replication barriers (one per Redis Cluster shard there);
  the placement read-only (it fences on it, policy writes it). Scripts, WAIT for replicas,
  CONFIG GET (the durability check at start), SCAN (the scrubber, KEK rotation).
- ``keeper-policy``: policy. Placements, VM records, workflows, hosts, templates, its
  indexes; never the store's state or data keys. Scripts, SCAN (VM listings).
- ``keeper-api``: the HTTP API. Only its operations' records and their liveness keys
  (``keeper:api:operation:*``), with GET, SET, EXISTS and DEL; it asks the services over
  the bus for everything else.
- ``keeper-replication``: what a replica logs in to its primary as (``masteruser``).
- ``keeper-sentinel``: what a Sentinel logs in to the nodes as (``sentinel auth-user``).
- ``keeper-admin``: every command and key, for the operator (backups, ``redis-cli``).
- ``default``: off, so nobody gets in without a user and password (see `DEFAULT_USER` for
  why it still has permissions).

The CLI has no user: it asks the services over the bus, never Redis.

Passwords come from the environment (``KEEPER_REDIS_STORE_PASSWORD``,
``KEEPER_REDIS_POLICY_PASSWORD``, ``KEEPER_REDIS_API_PASSWORD``,
``KEEPER_REDIS_REPLICATION_PASSWORD``,
``KEEPER_REDIS_SENTINEL_PASSWORD``, ``KEEPER_REDIS_ADMIN_PASSWORD``), never the command
line, where every user of the machine can read them; the file holds only their SHA-256.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from keeper_policy.storage import keys as policy_keys
from keeper_shared.messages.types import StateKind
from keeper_shared.redis_access import keys as shared_keys

ANY = "*"
"""A VM id or host id in a key pattern: every VM's (every host's) key."""

# What every service client sends besides its own work: SELECT (a database other than 0),
# CLUSTER SLOTS and COMMAND (a Redis Cluster client learning the layout and key positions),
# PING (readiness, and a Sentinel
# client's check of a new connection), the scripts behind every fenced write (redis-py's
# Script: EVALSHA, and SCRIPT EXISTS/LOAD when the server lacks one), MULTI/EXEC
# (pipeline(transaction=True)) and SCAN. Not CLIENT SETINFO, which redis-py sends on
# connecting and whose refusal it ignores (and Redis 7.0 does not know it).
_CLIENT_COMMANDS = (
    "select",
    "ping",
    "evalsha",
    "script|exists",
    "script|load",
    "multi",
    "exec",
    "discard",
    "scan",
    # A Redis Cluster client learns the slots' owners and the commands' key positions.
    "cluster|slots",
    "command",
)

STORE_COMMANDS: tuple[str, ...] = (
    *_CLIENT_COMMANDS,
    "config|get",  # storage/durability.py: appendonly and appendfsync at start
    "wait",  # storage/replication.py: a write counts once replicas hold it
    "incrby",  # its barrier before WAIT (redis-py sends INCR as INCRBY)
    *("get", "set", "del", "exists", "pexpire"),
    *("hget", "hmget", "hset", "hdel", "hexists", "hgetall", "hkeys", "hvals"),
    *("lrange", "llen", "lpop", "lpos", "lpush", "rpush"),
)
"""Commands the state store sends, directly or from its Lua scripts."""

POLICY_COMMANDS: tuple[str, ...] = (
    *_CLIENT_COMMANDS,
    *("get", "set", "del", "exists", "pexpire"),
    *("hget", "hmget", "hset", "hsetnx", "hdel", "hexists", "hgetall", "hvals", "hincrby"),
    *("sadd", "srem", "smembers"),
    *("zadd", "zrange", "zrem", "zscore"),
)
"""Commands policy sends, directly or from its Lua scripts."""

API_COMMANDS: tuple[str, ...] = ("select", "ping", "get", "set", "exists", "del")
"""Commands the API sends: its operations' records are read and written whole, and the
liveness key of each running one is renewed, checked and dropped."""

API_KEY_PATTERN = "keeper:api:operation:*"
"""The API's keys (``keeper_api.operations.OPERATION_KEY_PREFIX``; the API is not imported
here, a test holds the two together)."""

# Replication and Sentinel: the permissions the Redis manual gives for these roles.
_REPLICATION_RULES = ("+psync", "+replconf", "+ping")
_SENTINEL_RULES = (
    "&__sentinel__:hello",
    "+multi",
    "+slaveof",
    "+ping",
    "+exec",
    "+subscribe",
    "+config|rewrite",
    "+role",
    "+publish",
    "+info",
    "+client|setname",
    "+client|kill",
    "+script|kill",
)


def store_write_patterns() -> list[str]:
    """Keys the store reads and writes: each VM's state of every kind, its data key, TPM
    secret, snapshots and scrub lock, the replication barrier and the hosts' sealing keys."""
    per_vm = [
        shared_keys.data_key_key(ANY),
        shared_keys.tpm_secret_key(ANY),
        shared_keys.snapshots_key(ANY),
        shared_keys.scrub_lock_key(ANY),
    ]
    per_kind = [key for kind in StateKind for key in shared_keys.kind_state_keys(ANY, kind)]
    return [
        *per_vm,
        *per_kind,
        shared_keys.replication_barrier_key(),
        shared_keys.shard_barrier_key(ANY),
        shared_keys.host_sealing_keys_key(),
    ]


def store_read_patterns() -> list[str]:
    """Keys the store only reads: the placement its fencing checks against."""
    return [shared_keys.placement_key(ANY)]


def policy_patterns() -> list[str]:
    """Keys policy reads and writes (none of them hold TPM state or keys)."""
    return [
        shared_keys.placement_key(ANY),
        shared_keys.vm_record_key(ANY),
        shared_keys.hosts_key(),
        policy_keys.workflow_key(ANY),
        policy_keys.workflow_lease_key(ANY),
        policy_keys.workflow_result_key(ANY),
        policy_keys.migration_key(ANY),
        policy_keys.memory_snapshots_key(ANY),
        policy_keys.cleanup_lock_key(ANY),
        policy_keys.host_vms_key(ANY),
        policy_keys.host_cleanup_key(ANY),
        policy_keys.WORKFLOWS_INDEX,
        policy_keys.HOST_STATUS,
        policy_keys.EPOCH_PENDING,
        policy_keys.DISCOVERED,
        policy_keys.DISCOVERY_WAITING,
        policy_keys.TEMPLATES,
        policy_keys.TEMPLATE_NAMES,
        policy_keys.vm_name_key(ANY),
        policy_keys.NAMES_INDEXED,
    ]


@dataclass(frozen=True)
class AclUser:
    """One user: its name, where its password comes from, and its rules after ``reset``."""

    name: str
    password_variable: str
    rules: tuple[str, ...]


def _service_rules(
    commands: Iterable[str], patterns: Iterable[str], read_only: Iterable[str] = ()
) -> tuple[str, ...]:
    rules = (
        "-@all",
        *(f"+{command}" for command in commands),
        *(f"~{pattern}" for pattern in patterns),
        *(f"%R~{pattern}" for pattern in read_only),
    )
    if not read_only:
        return rules
    # Redis counts every key handed to a script as written, so EVALSHA with a read-only
    # key (the store's fencing scripts get the placement) needs a selector allowing it on
    # those keys. What the script then runs is checked against the rules above, not the
    # selector's: it may still only read the placement.
    keys = " ".join(f"~{pattern}" for pattern in (*patterns, *read_only))
    return (*rules, f"(+evalsha {keys})")


def users() -> list[AclUser]:
    """Every user of the ACL file but ``default``."""
    return [
        AclUser(
            "keeper-store",
            "KEEPER_REDIS_STORE_PASSWORD",
            _service_rules(STORE_COMMANDS, store_write_patterns(), store_read_patterns()),
        ),
        AclUser(
            "keeper-policy",
            "KEEPER_REDIS_POLICY_PASSWORD",
            _service_rules(POLICY_COMMANDS, policy_patterns()),
        ),
        AclUser(
            "keeper-api",
            "KEEPER_REDIS_API_PASSWORD",
            _service_rules(API_COMMANDS, [API_KEY_PATTERN]),
        ),
        AclUser("keeper-replication", "KEEPER_REDIS_REPLICATION_PASSWORD", _REPLICATION_RULES),
        AclUser("keeper-sentinel", "KEEPER_REDIS_SENTINEL_PASSWORD", _SENTINEL_RULES),
        AclUser("keeper-admin", "KEEPER_REDIS_ADMIN_PASSWORD", ("+@all", "~*", "&*")),
    ]


DEFAULT_USER = "user default off reset ~* &* +@all"
"""``default`` is off: no connection is ever logged in as it, and it has no password
(``reset``), so nobody can log in as it either. Its permissions are for Redis itself:
Redis 7.0 replays the append-only file as ``default`` and drops, with ``NOPERM ACLs rules
changed between the moment the transaction was accumulated and the EXEC``, every
MULTI/EXEC it may not run, which is every fenced write (a Lua script's writes are logged
as one transaction): with ``default`` allowed nothing, a restart loses acknowledged state.
(Found by the chaos run's Redis restart; tests/integration/devtools/
test_redis_deploy_files.py proves a restart keeps such writes.)"""


class MissingPasswordError(ValueError):
    """A user's password variable is unset or empty."""


def acl_file(environment: Mapping[str, str]) -> str:
    """The ACL file, passwords taken from ``environment`` and stored only as SHA-256."""
    lines = [DEFAULT_USER]
    for user in users():
        password = environment.get(user.password_variable, "")
        if not password:
            raise MissingPasswordError(f"set {user.password_variable} (the {user.name} password)")
        digest = hashlib.sha256(password.encode()).hexdigest()
        lines.append(" ".join(["user", user.name, "reset", "on", f"#{digest}", *user.rules]))
    return "\n".join(lines) + "\n"


def main() -> int:
    """Print the ACL file; exit 2 naming the first password variable that is missing."""
    try:
        sys.stdout.write(acl_file(os.environ))
    except MissingPasswordError as error:
        print(f"redis_acl: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
