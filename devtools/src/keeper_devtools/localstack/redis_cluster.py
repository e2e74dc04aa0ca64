"""A Redis Cluster on one machine: three primaries, each with one replica, from Debian's
``redis-server`` (``--cluster-enabled yes``), TLS on every link and the ACL users as on the
single Redis.

The slots are assigned and the nodes joined with CLUSTER ADDSLOTSRANGE, MEET and REPLICATE
over redis-py as the admin user (what ``redis-cli --cluster create`` does, without a
password on a command line). Each node has its own client port and an explicit cluster bus
port (``cluster-port``), all drawn free, and its own directory (AOF, ``nodes.conf``, log).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

from keeper_devtools.localstack import _process
from keeper_devtools.localstack.errors import LocalStackError
from keeper_devtools.localstack.redis import RedisConfig, RedisServer
from keeper_devtools.localstack.redis_users import ADMIN, RedisUsers
from keeper_devtools.tls import TlsFiles

SLOTS = 16384
PRIMARY_COUNT = 3
NODE_TIMEOUT_MS = 2000
"""How long a primary may be silent before its replica takes over (Redis's default is
15 s; the tests wait for failovers, an operator tunes this in ``deploy/redis``)."""


def cluster_arguments(bus_port: int, *, tls: bool) -> tuple[str, ...]:
    """The command-line options that make a server a node of the test cluster (a server
    started from ``deploy/redis/cluster.conf`` needs only ``--cluster-port``)."""
    args = [
        "--cluster-enabled", "yes",
        "--cluster-port", str(bus_port),
        "--cluster-node-timeout", str(NODE_TIMEOUT_MS),
        # A replica whose primary is gone takes over however long it was cut off: the
        # tests kill primaries on purpose; deploy/redis/cluster.conf keeps Redis's default.
        "--cluster-replica-validity-factor", "0",
    ]  # fmt: skip
    if tls:
        args += ["--tls-cluster", "yes"]
    return tuple(args)


class RedisClusterGroup:
    """Three primaries and three replicas (`local`: under ``base_dir``, ``node-1`` … ``node-6``),
    AOF on with ``appendfsync always``; nodes 1-3 start as primaries, 4-6 replicate them."""

    def __init__(
        self,
        servers: list[RedisServer],
        bus_ports: dict[int, int],
        *,
        tls: TlsFiles | None = None,
        users: RedisUsers | None = None,
    ) -> None:
        """Manage ``servers`` (six, started as cluster nodes; ``bus_ports``: client port ->
        cluster bus port) as one cluster; nothing is started. `local` makes the servers."""
        if len(servers) != 2 * PRIMARY_COUNT:
            raise LocalStackError(
                f"a cluster here has {2 * PRIMARY_COUNT} nodes, not {len(servers)}"
            )
        self.servers = servers
        self._bus_ports = bus_ports
        self.tls = tls
        self.users = users

    @classmethod
    def local(
        cls, base_dir: Path, *, tls: TlsFiles | None = None, users: RedisUsers | None = None
    ) -> RedisClusterGroup:
        """Six servers on free ports under ``base_dir``, configured on the command line."""
        ports = _process.free_tcp_ports(4 * PRIMARY_COUNT)
        client_ports, bus_ports = ports[: 2 * PRIMARY_COUNT], ports[2 * PRIMARY_COUNT :]
        servers = [
            RedisServer(
                RedisConfig(
                    port=port,
                    base_dir=base_dir / f"node-{index + 1}",
                    tls=tls,
                    users=users,
                    extra_args=cluster_arguments(bus_port, tls=tls is not None),
                )
            )
            for index, (port, bus_port) in enumerate(zip(client_ports, bus_ports, strict=True))
        ]
        return cls(servers, dict(zip(client_ports, bus_ports, strict=True)), tls=tls, users=users)

    @property
    def startup_nodes(self) -> list[str]:
        """``host:port`` of every node, as services take them (any one would do)."""
        return [f"127.0.0.1:{server.config.port}" for server in self.servers]

    def start(self, timeout: float = 60.0) -> None:
        """Start the six nodes, assign the slots, join them and wait until every node says
        the cluster is ok and every replica has synced; stopped again when that fails."""
        try:
            for server in self.servers:
                server.start()
            deadline = time.monotonic() + timeout
            if not self._cluster_ok():
                self._form_cluster(deadline)
            self._wait(self._cluster_ok, "every node to report cluster_state:ok", deadline)
            self._wait(self._replicas_in_sync, "every replica to sync", deadline)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop every node; idempotent."""
        for server in self.servers:
            server.stop()

    def server_on(self, port: int) -> RedisServer:
        """The node listening on ``port``."""
        for server in self.servers:
            if server.config.port == port:
                return server
        raise LocalStackError(f"no node of the cluster listens on {port}")

    def primary_of_slot(self, slot: int) -> RedisServer:
        """The node that serves ``slot`` now, as the first answering node sees it."""
        for server in self.servers:
            try:
                shards = self.ask(server, "CLUSTER", "SLOTS")
            except redis.RedisError:
                continue
            for first, last, primary, *_ in shards:
                if first <= slot <= last:
                    return self.server_on(int(primary[1]))
        raise LocalStackError(f"no node serves slot {slot}")

    def wait_for_primary_change(
        self, slot: int, old_primary: RedisServer, timeout: float = 60.0
    ) -> RedisServer:
        """Wait until another node serves ``slot`` and every live node agrees the cluster
        is ok; return the new primary."""
        deadline = time.monotonic() + timeout

        def taken_over() -> bool:
            try:
                return self.primary_of_slot(slot) is not old_primary and self._cluster_ok()
            except LocalStackError:
                return False

        self._wait(taken_over, f"a replica to take over slot {slot}", deadline)
        return self.primary_of_slot(slot)

    def wait_for_replicas(self, timeout: float = 60.0) -> None:
        """Wait until every primary has a replica online (a returning old primary turns
        into one)."""
        self._wait(
            self._replicas_in_sync, "every primary to have a replica", time.monotonic() + timeout
        )

    def ask(self, server: RedisServer, *command: str | int) -> Any:
        """One command on ``server`` as the admin user."""
        client = self._client(server)
        try:
            return client.execute_command(*command)  # type: ignore[no-untyped-call]
        finally:
            client.close()

    def _client(self, server: RedisServer) -> redis.Redis:
        username, password = self.users.login(ADMIN) if self.users else (None, None)
        tls: dict[str, Any] = (
            {} if self.tls is None else {"ssl": True, "ssl_ca_certs": str(self.tls.ca)}
        )
        return redis.Redis(
            host="127.0.0.1",
            port=server.config.port,
            username=username,
            password=password,
            socket_timeout=2,
            socket_connect_timeout=1,
            decode_responses=True,
            **tls,
        )

    def _form_cluster(self, deadline: float) -> None:
        primaries, replicas = self.servers[:PRIMARY_COUNT], self.servers[PRIMARY_COUNT:]
        step = SLOTS // PRIMARY_COUNT
        for index, primary in enumerate(primaries):
            last = SLOTS - 1 if index == PRIMARY_COUNT - 1 else (index + 1) * step - 1
            self.ask(primary, "CLUSTER", "ADDSLOTSRANGE", index * step, last)
        first = self.servers[0]
        for server in self.servers[1:]:
            port = server.config.port
            self.ask(first, "CLUSTER", "MEET", "127.0.0.1", port, self._bus_ports[port])
        self._wait(self._all_nodes_known, "the nodes to learn of each other", deadline)
        for primary, replica in zip(primaries, replicas, strict=True):
            node_id = self.ask(primary, "CLUSTER", "MYID")
            self.ask(replica, "CLUSTER", "REPLICATE", node_id)

    def _all_nodes_known(self) -> bool:
        return all(
            len(self.ask(server, "CLUSTER", "NODES").splitlines()) == len(self.servers)
            for server in self.servers
        )

    def _cluster_ok(self) -> bool:
        """Every live node reports cluster_state:ok (a killed one is left out)."""
        live = [server for server in self.servers if server.pid() is not None]
        try:
            return bool(live) and all(
                "cluster_state:ok" in self.ask(server, "CLUSTER", "INFO") for server in live
            )
        except redis.RedisError:
            return False

    def _replicas_in_sync(self) -> bool:
        try:
            roles = [self.ask(server, "ROLE") for server in self.servers]
        except redis.RedisError:
            return False
        replicas = [role for role in roles if role[0] == "slave"]
        primaries = [role for role in roles if role[0] == "master"]
        return (
            len(primaries) == PRIMARY_COUNT
            and all(role[3] == "connected" for role in replicas)
            and all(len(role[2]) >= 1 for role in primaries)
            and self._every_node_lists_the_replicas()
        )

    def _every_node_lists_the_replicas(self) -> bool:
        """Every live node's CLUSTER SLOTS names a replica for each range: what a client
        learns the nodes from (a primary hears of its new replica by gossip, a moment after
        the replica itself reports it is connected)."""
        live = [server for server in self.servers if server.pid() is not None]
        return all(
            all(len(entry) >= 4 for entry in self.ask(server, "CLUSTER", "SLOTS"))
            for server in live
        )

    @staticmethod
    def _wait(condition: Callable[[], bool], what: str, deadline: float) -> None:
        while True:
            try:
                if condition():
                    return
            except redis.RedisError:
                pass
            if time.monotonic() >= deadline:
                raise LocalStackError(f"timed out waiting for {what}")
            time.sleep(0.1)
