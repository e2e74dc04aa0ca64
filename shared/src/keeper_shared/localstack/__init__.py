"""The local stack: a private RabbitMQ node and a private Redis server from Debian's packages.

``deploy/local/stack`` and ``make demo`` use it through ``python -m keeper_shared.localstack``;
the test fixtures use the classes directly, each with its own ports and directories.
"""

from keeper_shared.localstack._process import free_tcp_ports
from keeper_shared.localstack.errors import LocalStackError, NotInstalledError
from keeper_shared.localstack.rabbitmq import RabbitMQConfig, RabbitMQNode
from keeper_shared.localstack.redis import RedisConfig, RedisServer
from keeper_shared.localstack.settings import LocalStackSettings

__all__ = [
    "LocalStackError",
    "LocalStackSettings",
    "NotInstalledError",
    "RabbitMQConfig",
    "RabbitMQNode",
    "RedisConfig",
    "RedisServer",
    "free_tcp_ports",
]
