"""`run_replicated` on a Redis Cluster: one pipeline over the shards, each shard's writes
followed by a WAIT on that shard's own connection.

Each queued command touches one VM's keys, all in one slot (``keeper_shared.redis_access.
keys``), so the cluster pipeline sends it to the primary of that slot; no command spans
two slots. WAIT counts the replicas of the shard it runs on, for the writes made on its
connection, so it goes to every shard that was written, after a barrier write of its own
(in a slot that shard serves) that covers writes other clients made before.

A write sent to a node that no longer serves its slot (a failover just moved it) is not
followed there: it fails as that write's result, the client learns the new layout, and the
caller's retry (a redelivered event) reaches the new primary, where its WAIT covers it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Generator, Iterable
from typing import Any, cast

from redis.asyncio.client import Pipeline
from redis.asyncio.cluster import ClusterNode, ClusterPipeline
from redis.exceptions import AskError, MovedError, NoScriptError, ResponseError, TryAgainError

from keeper_shared.redis_access.connection import KeeperRedisCluster
from keeper_shared.redis_access.keys import shard_barrier_key

QueuedCommand = tuple[tuple[Any, ...], dict[str, Any]]
"""A command's arguments and options as the queue gave them."""

_REDIRECTED = (MovedError, AskError, TryAgainError)


class _RecordingPipeline(ClusterPipeline):
    """A cluster pipeline that records what is queued on it and is never executed itself.

    Awaiting a queued command (redis-py's scripts do) returns the pipeline as it is:
    ``ClusterPipeline.__await__`` would start it afresh and drop what was queued.
    """

    def __init__(self, client: KeeperRedisCluster) -> None:
        super().__init__(client)
        self.recorded: list[QueuedCommand] = []

    def execute_command(self, *args: Any, **kwargs: Any) -> ClusterPipeline:
        self.recorded.append((args, kwargs))
        return self

    # redis-py blocks EVALSHA on a cluster pipeline because it cannot tell that a script's
    # keys share a slot; ours do (see the module's docstring), and `_execute` sends each
    # one as a plain command, which the pipeline routes by its first key.
    def evalsha(self, sha: str, numkeys: int, *keys_and_args: Any) -> ClusterPipeline:  # type: ignore[override]
        return self.execute_command("EVALSHA", sha, numkeys, *keys_and_args)

    def __await__(self) -> Generator[Any, None, ClusterPipeline]:
        async def itself() -> ClusterPipeline:
            return self

        return itself().__await__()


async def run_on_cluster(
    cluster: KeeperRedisCluster,
    min_replicas: int,
    timeout_ms: int,
    queue: Callable[[Pipeline], Awaitable[Any]],
) -> list[Any]:
    """The results of the commands ``queue`` adds, errors among them, once ``min_replicas``
    of each written shard hold them (`NotReplicatedError` from ``replication`` when not).
    A script command that met NOSCRIPT runs again once its script is loaded everywhere."""
    recorder = _RecordingPipeline(cluster)
    # Typed as the single-Redis pipeline the queue functions take: they only queue commands
    # and scripts on it, which the cluster pipeline has under the same names.
    await queue(cast(Pipeline, recorder))
    commands = recorder.recorded
    results = await _execute(cluster, commands, min_replicas, timeout_ms)
    forgotten = [index for index, result in enumerate(results) if isinstance(result, NoScriptError)]
    if forgotten:
        for sha in {commands[index][0][1] for index in forgotten}:
            # SCRIPT LOAD goes to every primary of the cluster.
            await cluster.script_load(cluster.scripts[sha].script)
        again = await _execute(cluster, [commands[i] for i in forgotten], min_replicas, timeout_ms)
        for index, result in zip(forgotten, again, strict=True):
            results[index] = result
    return results


async def _execute(
    cluster: KeeperRedisCluster, commands: list[QueuedCommand], min_replicas: int, timeout_ms: int
) -> list[Any]:
    from keeper_state_store.storage.replication import NotReplicatedError  # avoids a cycle

    pipe = ClusterPipeline(cluster)
    await pipe.initialize()
    for args, kwargs in commands:
        pipe.execute_command(*args, **kwargs)
    shards = _written_shards(cluster, (args for args, _ in commands)) if min_replicas else []
    for shard in shards:
        pipe.incr(_barrier_on(cluster, shard))
        pipe.execute_command("WAIT", min_replicas, timeout_ms, target_nodes=shard)
    results: list[Any] = await pipe.execute(raise_on_error=False, allow_redirections=False)
    if any(isinstance(result, _REDIRECTED) for result in results):
        # Learn the new layout before the next command; this attempt's redirected writes
        # fail and are retried by their callers.
        await cluster.aclose()
    results, waits = results[: len(commands)], results[len(commands) :]
    for shard, (barrier, replicas) in zip(
        shards, zip(waits[::2], waits[1::2], strict=True), strict=True
    ):
        for reply in (barrier, replicas):
            if isinstance(reply, Exception):
                raise NotReplicatedError(f"no replica count from Redis {shard.name}: {reply}")
        if int(replicas) < min_replicas:
            raise NotReplicatedError(
                f"{replicas} of {min_replicas} replicas of Redis {shard.name} acknowledged "
                f"the write within {timeout_ms} ms"
            )
    return results


def _written_shards(
    cluster: KeeperRedisCluster, commands: Iterable[tuple[Any, ...]]
) -> list[ClusterNode]:
    """The primaries the commands go to, each once (a command's first key decides)."""
    shards: dict[str, ClusterNode] = {}
    for args in commands:
        name = str(args[0]).upper()
        key = args[3] if name in ("EVALSHA", "EVAL") else args[1]
        node = _primary_for(cluster, key)
        shards.setdefault(node.name, node)
    return list(shards.values())


def _barrier_on(cluster: KeeperRedisCluster, shard: ClusterNode) -> str:
    """A barrier key in a slot ``shard`` serves (a few CRC16s: each tag lands in a random
    slot, so one of the first dozen or so lands on any one of a few shards)."""
    for number in range(16384):
        key = shard_barrier_key(f"barrier-{number}")
        if _primary_for(cluster, key).name == shard.name:
            return key
    raise ResponseError(f"no slot of Redis {shard.name} found for a barrier key")


def _primary_for(cluster: KeeperRedisCluster, key: str) -> ClusterNode:
    node = cluster.get_node_from_key(key)
    if node is None:
        raise ResponseError(f"the cluster client knows no primary for slot {cluster.keyslot(key)}")
    return node
