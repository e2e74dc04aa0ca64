"""The chaos run on the distributed engines: a 3-node RabbitMQ cluster and a
Redis primary with a replica and three Sentinels. Same load, same checks, same table as the
single-node run; a broker restart is a node SIGKILLed and started again, a Redis restart a
primary SIGKILLed and failed over (the store waits for one replica before it acknowledges).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from chaos.backend import DistributedBackend
from chaos.faults import FaultKind
from chaos.scenario import DISTRIBUTED_LONG_PROFILE, DISTRIBUTED_PROFILE, run_chaos
from keeper_devtools.localstack import RabbitMQCluster, RedisSentinelGroup

LONG = os.environ.get("KEEPER_CHAOS_PROFILE") == "long"
"""``make chaos`` runs the long profile; ``pytest -m on_demand`` the short one (~100 s)."""

# Not in `make test`: the other tests/distributed tests kill a node and fail the primary
# over there; this whole run is what `make chaos` adds.
pytestmark = [
    pytest.mark.on_demand,
    pytest.mark.chaos,
    pytest.mark.rabbit,
    pytest.mark.redis,
    pytest.mark.libvirt,
]


@pytest.mark.timeout(3600 if LONG else 900)
async def test_every_fault_on_the_distributed_engines_keeps_every_invariant(
    rabbitmq_cluster: RabbitMQCluster, redis_sentinel_group: RedisSentinelGroup, tmp_path: Path
) -> None:
    backend = DistributedBackend(rabbitmq_cluster, redis_sentinel_group)
    profile = DISTRIBUTED_LONG_PROFILE if LONG else DISTRIBUTED_PROFILE
    report = await run_chaos(backend, profile, tmp_path / "chaos")
    table = report.table()
    print()
    print(table)
    failures = report.failures()
    assert not failures, "\n".join([table, *report.fault_log, *failures])
    assert report.faults[FaultKind.BROKER_RESTART] >= 2
    assert report.faults[FaultKind.REDIS_RESTART] >= 2
