"""A RabbitMQ cluster of private nodes on one machine, for what a single node cannot show:
quorum queues replicated over three nodes, and clients moving to another node when theirs
dies."""

from __future__ import annotations

import json
import secrets
import string
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from keeper_devtools.localstack import _process
from keeper_devtools.localstack.errors import LocalStackError
from keeper_devtools.localstack.rabbitmq import RabbitMQConfig, RabbitMQNode
from keeper_devtools.tls import TlsFiles


class RabbitMQCluster:
    """Starts ``size`` private nodes (``<prefix>-1@localhost`` …), each with its own AMQP
    and distribution ports and directory under ``base_dir``, joins them into one cluster,
    and stops, kills or restarts single nodes.

    A quorum queue declared once the cluster has formed gets a member on every node
    (RabbitMQ's default initial group size is the cluster size), so it survives the loss
    of any one node.
    """

    def __init__(
        self, base_dir: Path, *, prefix: str, size: int = 3, tls: TlsFiles | None = None
    ) -> None:
        """Prepare the nodes on free ports (nothing is started); with ``tls`` each takes
        AMQP over TLS only (the nodes' own Erlang distribution stays on loopback)."""
        if size < 1:
            raise ValueError("a cluster needs at least one node")
        ports = _process.free_tcp_ports(2 * size + 1)
        # The nodes find each other through one port mapper of their own (the last port),
        # which the last node's stop stops: the machine's shared one would outlive them.
        epmd_port = ports[-1]
        # One cookie for all: Erlang nodes only talk to nodes that present the same one.
        cookie = "".join(secrets.choice(string.ascii_uppercase) for _ in range(32))
        self.nodes = [
            RabbitMQNode(
                RabbitMQConfig(
                    name=f"{prefix}-{index + 1}",
                    amqp_port=ports[2 * index],
                    dist_port=ports[2 * index + 1],
                    epmd_port=epmd_port,
                    base_dir=base_dir / f"node-{index + 1}",
                    erlang_cookie=cookie,
                    tls=tls,
                )
            )
            for index in range(size)
        ]

    @property
    def amqp_urls(self) -> list[str]:
        """Every node's AMQP URL, the first node first."""
        return [node.amqp_url for node in self.nodes]

    def start(self, timeout: float = 90.0) -> None:
        """Start every node (in parallel: each boots its own Erlang VM) and join the others
        to the first. Raises LocalStackError, after stopping what started, on failure."""
        try:
            with ThreadPoolExecutor(max_workers=len(self.nodes)) as pool:
                for started in [pool.submit(node.start, timeout) for node in self.nodes]:
                    started.result()
            for node in self.nodes[1:]:
                self._join(node, self.nodes[0])
        except BaseException:
            self.stop()
            raise

    def running_nodes(self) -> list[str]:
        """The names of the nodes the first live node reports as running in the cluster."""
        for node in self.nodes:
            if not node.is_running():
                continue
            result = node.ctl("cluster_status", "--formatter", "json", timeout=30.0)
            if result is not None and result.returncode == 0:
                return sorted(json.loads(result.stdout).get("running_nodes", []))
        return []

    def stop(self) -> None:
        """Stop every node, the joined ones first; idempotent."""
        errors: list[str] = []
        for node in reversed(self.nodes):
            try:
                node.stop()
            except LocalStackError as error:
                errors.append(str(error))
        if errors:
            raise LocalStackError("; ".join(errors))

    @staticmethod
    def _join(node: RabbitMQNode, seed: RabbitMQNode) -> None:
        for step in (("stop_app",), ("join_cluster", seed.config.node), ("start_app",)):
            result = node.ctl(*step, timeout=60.0)
            if result is None or result.returncode != 0:
                detail = "timed out" if result is None else result.stderr.strip()[-500:]
                raise LocalStackError(
                    f"rabbitmqctl -n {node.config.node} {' '.join(step)} failed: {detail}"
                )
