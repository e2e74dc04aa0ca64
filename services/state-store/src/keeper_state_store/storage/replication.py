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
from redis.exceptions import NoScriptError, ResponseError

from keeper_shared.redis_access.connection import cluster_of
from keeper_shared.redis_access.keys import replication_barrier_key
from keeper_state_store.storage.cluster_replication import run_on_cluster


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
    redis: Redis,
    quorum: ReplicaQuorum,
    queue: Callable[[Pipeline], Awaitable[Any]],
    *,
    raise_on_error: bool = True,
) -> list[Any]:
    """Run the commands ``queue`` adds to a pipeline, then wait for ``quorum``; return the
    commands' results. Raises NotReplicatedError when too few replicas answered in time, and
    the first command's error (as redis-py does) when one failed; with ``raise_on_error``
    false a failed command's error is its result instead, so one bad write does not fail
    the others.

    Everything runs on one connection, because WAIT waits for the replication offset of
    its own connection's last write. A barrier write just before it makes that offset
    cover every write made before, by anyone, even when the queued commands wrote nothing.

    A script command that met NOSCRIPT ran nothing; it runs again, after the others, once
    its script is loaded. Queue only commands whose order among each other does not matter
    (one fenced write per VM and kind, say).

    On a Redis Cluster the same holds per shard (see ``cluster_replication``).
    """
    cluster = cluster_of(redis)
    if cluster is not None:
        results = await run_on_cluster(cluster, quorum.min_replicas, quorum.timeout_ms, queue)
        _raise_first_error(results, raise_on_error)
        return results
    async with redis.pipeline(transaction=False) as pipe:
        await queue(pipe)
        scripts = set(pipe.scripts)
        shas = {script.sha for script in scripts}
        loaded = _scripts_loaded.setdefault(redis, set())
        # redis-py asks SCRIPT EXISTS before every pipeline that holds a script: one more
        # round trip per write. A script this server already ran is trusted to be there;
        # if it is not (a restart, a failover), its NOSCRIPT replies are retried below.
        if shas <= loaded:
            pipe.scripts.clear()
        commands = list(pipe.command_stack)
        results = await _execute(pipe, quorum)
    loaded |= shas
    forgotten = [index for index, result in enumerate(results) if isinstance(result, NoScriptError)]
    if forgotten:
        async with redis.pipeline(transaction=False) as pipe:
            pipe.scripts |= scripts  # loaded first (SCRIPT EXISTS, SCRIPT LOAD)
            pipe.command_stack.extend(commands[index] for index in forgotten)
            for index, result in zip(forgotten, await _execute(pipe, quorum), strict=True):
                results[index] = result
    _raise_first_error(results, raise_on_error)
    return results


def _raise_first_error(results: list[Any], raise_on_error: bool) -> None:
    for result in results:
        if raise_on_error and isinstance(result, ResponseError):
            raise result


_scripts_loaded: WeakKeyDictionary[Redis, set[str]] = WeakKeyDictionary()
"""Per client, the scripts (by sha) its server is known to hold."""


async def _execute(pipe: Pipeline, quorum: ReplicaQuorum) -> list[Any]:
    """The pipeline's results, errors among them, once the replicas hold its writes."""
    if quorum.min_replicas:
        pipe.incr(replication_barrier_key())
        pipe.wait(quorum.min_replicas, quorum.timeout_ms)
    results: list[Any] = await pipe.execute(raise_on_error=False)
    if not quorum.min_replicas:
        return results
    *results, barrier, replicas = results
    for reply in (barrier, replicas):
        if isinstance(reply, ResponseError):
            raise reply
    if int(replicas) < quorum.min_replicas:
        raise NotReplicatedError(
            f"{replicas} of {quorum.min_replicas} Redis replicas acknowledged the write "
            f"within {quorum.timeout_ms} ms"
        )
    return results
