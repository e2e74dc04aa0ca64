"""The local stack: a private RabbitMQ node and a private Redis server from Debian's packages,
and, for the distributed engines, a three-node RabbitMQ cluster, a Sentinel-managed Redis and
a Redis Cluster.

``deploy/local/stack`` and ``make demo`` use it through ``python -m keeper_devtools.localstack``;
the test fixtures use the classes directly, each with its own ports and directories.
"""

from keeper_devtools.localstack._process import free_tcp_ports
from keeper_devtools.localstack.errors import LocalStackError, NotInstalledError
from keeper_devtools.localstack.rabbitmq import RabbitMQConfig, RabbitMQNode
from keeper_devtools.localstack.rabbitmq_cluster import RabbitMQCluster
from keeper_devtools.localstack.redis import RedisConfig, RedisServer
from keeper_devtools.localstack.redis_cluster import RedisClusterGroup
from keeper_devtools.localstack.redis_sentinel import RedisSentinel, RedisSentinelGroup
from keeper_devtools.localstack.settings import LocalStackSettings

__all__ = [
    "LocalStackError",
    "LocalStackSettings",
    "NotInstalledError",
    "RabbitMQCluster",
    "RabbitMQConfig",
    "RabbitMQNode",
    "RedisClusterGroup",
    "RedisConfig",
    "RedisSentinel",
    "RedisSentinelGroup",
    "RedisServer",
    "free_tcp_ports",
]
