"""A host agent in a network namespace of its own, joined to the machine by a veth pair,
so the host can be cut off the way a real one is: its link goes down.

The broker listens on loopback only; the agent reaches it through a `TcpProxy` listening
on the host side of its veth pair. Cutting the host sets that side's link down (packets
vanish, nothing is refused) and resets the proxy's connections, as the broker drops a
client whose heartbeats stopped; healing sets the link up, and the agent's next packet
learns that its connection is gone and it reconnects. Needs root and ``ip`` (iproute2).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
from dataclasses import dataclass

from chaos.tcp_proxy import TcpProxy

NETNS_DIR = "/run/netns"
NETNS_ETC_DIR = "/etc/netns"
"""``ip netns exec NS`` bind-mounts the files of ``/etc/netns/NS/`` over ``/etc/``."""
MACHINE_NAME = "keeper-machine"
"""The name an agent in a namespace dials the machine by (its ``/etc/hosts`` there maps it
to the machine's address), so the servers' TLS certificate can name it: the address
itself is random per run."""
_netns_dir_was_mounted: bool | None = None
"""Whether ``ip netns add`` found /run/netns mounted already when this process first made a
namespace; if not, it mounted it, and the last `HostNetwork.destroy` unmounts it again (so
a run leaves the machine's mounts as it found them)."""


class NetnsUnavailableError(RuntimeError):
    """Network namespaces cannot be made here (not root, no ``ip``, or the kernel said no)."""


def _ip(*args: str) -> None:
    try:
        subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)
    except subprocess.CalledProcessError as error:
        raise NetnsUnavailableError(f"ip {' '.join(args)}: {error.stderr.strip()}") from error


def _is_mount_point(path: str) -> bool:
    """Whether ``path`` is a mount point, bind mounts of its own filesystem included (which
    ``os.path.ismount`` misses: ``ip netns`` bind-mounts /run/netns onto itself)."""
    with open("/proc/self/mountinfo", encoding="utf-8") as mounts:
        return any(line.split()[4] == path for line in mounts)


@dataclass(frozen=True)
class HostNetwork:
    """One namespace, its veth pair and a /30 between them."""

    namespace: str
    host_side: str
    """The veth end on the machine's side (its link is what a cut sets down)."""
    machine_address: str
    """The address the agent reaches the machine at (the proxy listens there)."""

    @classmethod
    def create(cls, index: int) -> HostNetwork:
        """Make the namespace, the pair and the addresses; undo all of it on failure."""
        if os.geteuid() != 0 or shutil.which("ip") is None:
            raise NetnsUnavailableError("network namespaces need root and iproute2's ip")
        tag = secrets.token_hex(3)
        # Interface names are at most 15 characters; a random subnet keeps runs apart.
        namespace = f"keeper-{tag}-{index}"
        host_side, ns_side = f"kh{tag}{index}", f"kn{tag}{index}"
        subnet = f"10.{secrets.randbelow(200) + 50}.{secrets.randbelow(256)}"
        network = cls(namespace, host_side, f"{subnet}.1")
        global _netns_dir_was_mounted
        if _netns_dir_was_mounted is None:
            _netns_dir_was_mounted = _is_mount_point(NETNS_DIR)
        try:
            _ip("netns", "add", namespace)
            _ip("link", "add", host_side, "type", "veth", "peer", "name", ns_side)
            _ip("link", "set", ns_side, "netns", namespace)
            _ip("addr", "add", f"{subnet}.1/30", "dev", host_side)
            _ip("link", "set", host_side, "up")
            _ip("-n", namespace, "addr", "add", f"{subnet}.2/30", "dev", ns_side)
            _ip("-n", namespace, "link", "set", ns_side, "up")
            _ip("-n", namespace, "link", "set", "lo", "up")
            etc = os.path.join(NETNS_ETC_DIR, namespace)
            os.makedirs(etc, exist_ok=True)
            with open(os.path.join(etc, "hosts"), "w", encoding="ascii") as hosts:
                hosts.write(f"127.0.0.1 localhost\n{subnet}.1 {MACHINE_NAME}\n")
        except NetnsUnavailableError:
            network.destroy()
            raise
        return network

    @property
    def command_prefix(self) -> tuple[str, ...]:
        """Run a command inside the namespace."""
        return ("ip", "netns", "exec", self.namespace)

    def cut(self) -> None:
        """Set the machine's side of the link down."""
        _ip("link", "set", self.host_side, "down")

    def heal(self) -> None:
        """Set it up again."""
        _ip("link", "set", self.host_side, "up")

    def destroy(self) -> None:
        """Remove the namespace and the pair (either may be half made); never raises."""
        for args in (("link", "del", self.host_side), ("netns", "del", self.namespace)):
            subprocess.run(["ip", *args], capture_output=True, timeout=30, check=False)
        shutil.rmtree(os.path.join(NETNS_ETC_DIR, self.namespace), ignore_errors=True)
        with contextlib.suppress(OSError):  # only when empty: another namespace's is kept
            os.rmdir(NETNS_ETC_DIR)
        # Unmounted only when empty: another namespace may still live there.
        ours = _netns_dir_was_mounted is False and _is_mount_point(NETNS_DIR)
        if ours and not os.listdir(NETNS_DIR):
            subprocess.run(["umount", NETNS_DIR], capture_output=True, timeout=30, check=False)


@dataclass(frozen=True)
class HostLink:
    """How one host agent reaches the broker: a proxy, inside a namespace when possible."""

    proxy: TcpProxy
    network: HostNetwork | None
    """None where namespaces cannot be made: a cut then only resets and refuses the
    agent's connections at the proxy (the table says which kind of cut ran)."""

    @property
    def dial_host(self) -> str:
        """What the agent dials: `MACHINE_NAME` in a namespace, else the proxy's address."""
        return MACHINE_NAME if self.network is not None else self.proxy.listen_host

    def cut(self) -> None:
        """Cut the host off."""
        if self.network is not None:
            self.network.cut()
        self.proxy.cut()

    def heal(self) -> None:
        """Let it reach the broker again."""
        if self.network is not None:
            self.network.heal()
        self.proxy.heal()
