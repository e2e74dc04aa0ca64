"""Counting a Redis write as durable only once replicas hold it (Redis WAIT).

With a replicated Redis, a write the primary answered can still be lost: the primary
crashes before its replica copied it, and the Sentinels promote the replica. Waiting for
``min_replicas`` to acknowledge before the store acknowledges the event closes that window.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from weakref import WeakKeyDictionary

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.exceptions import NoScriptError

from keeper_shared.redis_keys import replication_barrier_key


class NotReplicatedError(RuntimeError):
    """The write reached the primary but not enough replicas in time; it must not be
    acknowledged (a retry finds it done and waits again)."""


@dataclass(frozen=True)
class ReplicaQuorum:
    """How many replicas must hold a write before it counts as durable, and how long one
    write waits for them; 0 replicas: a single Redis, no waiting."""

    min_replicas: int = 0
    timeout_ms: int = 1000


NO_REPLICAS = ReplicaQuorum()
"""A single Redis: a write is durable once the primary's append-only file has it."""


async def run_replicated(
    redis: Redis, quorum: ReplicaQuorum, queue: Callable[[Pipeline], Awaitable[Any]]
) -> list[Any]:
    """Run the commands ``queue`` adds to a pipeline, then wait for ``quorum``; return the
    commands' results. Raises NotReplicatedError when too few replicas answered in time.

    Everything runs on one connection, because WAIT waits for the replication offset of
    its own connection's last write. A barrier write just before it makes that offset
    cover every write made before, by anyone, even when the queued commands wrote nothing.
    """
    try:
        return await _run_once(redis, quorum, queue, trust_script_cache=True)
    except NoScriptError:
        # The server forgot its scripts (a restart, or a failover to a replica): nothing of
        # the lone script ran, so running it again, loading it first, is safe.
        _scripts_loaded.pop(redis, None)
        return await _run_once(redis, quorum, queue, trust_script_cache=False)


_scripts_loaded: WeakKeyDictionary[Redis, set[str]] = WeakKeyDictionary()
"""Per client, the scripts (by sha) its server is known to hold."""


async def _run_once(
    redis: Redis,
    quorum: ReplicaQuorum,
    queue: Callable[[Pipeline], Awaitable[Any]],
    *,
    trust_script_cache: bool,
) -> list[Any]:
    async with redis.pipeline(transaction=False) as pipe:
        await queue(pipe)
        shas = {script.sha for script in pipe.scripts}
        loaded = _scripts_loaded.setdefault(redis, set())
        # redis-py asks SCRIPT EXISTS before every pipeline that holds a script: one more
        # round trip per stored version. Skipped for a script this server already ran, but
        # only when the script is the pipeline's one command, so that a NOSCRIPT reply
        # means nothing ran and the retry above cannot apply anything twice.
        if trust_script_cache and len(pipe.command_stack) == 1 and shas <= loaded:
            pipe.scripts.clear()
        if quorum.min_replicas:
            pipe.incr(replication_barrier_key())
            pipe.wait(quorum.min_replicas, quorum.timeout_ms)
        results: list[Any] = await pipe.execute()
    loaded |= shas
    if not quorum.min_replicas:
        return results
    *results, _barrier, replicas = results
    if int(replicas) < quorum.min_replicas:
        raise NotReplicatedError(
            f"{replicas} of {quorum.min_replicas} Redis replicas acknowledged the write "
            f"within {quorum.timeout_ms} ms"
        )
    return results
