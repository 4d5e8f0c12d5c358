"""A private network of Linux network namespaces, for cutting nodes off for real.

    with NetLab(3) as lab:
        lab.address(2)               # "10.201.0.2"
        lab.run(2, [...])            # argv prefixed with `ip netns exec <ns of node 2>`
        lab.cut(2); lab.heal(2)      # take node 2's link down / up again

One hub namespace holds a bridge; each node namespace has a veth pair into it. Nothing
touches the host's own namespace, so no host address or route changes. Everything is
deleted on exit, also when the test fails.
"""

from __future__ import annotations

import secrets
import shutil
import subprocess

SUBNET = "10.201.0"


def missing() -> str | None:
    """Why namespaces cannot be made here, or None."""
    if shutil.which("ip") is None:
        return "iproute2 (ip) not installed"
    probe = f"cfsprobe{secrets.token_hex(3)}"
    r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if r.returncode != 0:
        return f"cannot create a network namespace: {r.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


class NetLab:
    def __init__(self, nodes: int) -> None:
        tag = secrets.token_hex(3)
        self.hub = f"cfsh{tag}"
        self.ns = {n: f"cfs{tag}n{n}" for n in range(1, nodes + 1)}
        self._made: list[str] = []

    def __enter__(self) -> NetLab:
        try:
            self._ip("netns", "add", self.hub)
            self._made.append(self.hub)
            self._ip("-n", self.hub, "link", "add", "br0", "type", "bridge")
            self._ip("-n", self.hub, "link", "set", "br0", "up")
            for n, ns in self.ns.items():
                self._add_node(n, ns)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for ns in reversed(self._made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self._made.clear()

    def _add_node(self, n: int, ns: str) -> None:
        self._ip("netns", "add", ns)
        self._made.append(ns)
        self._ip("-n", ns, "link", "set", "lo", "up")
        # the veth pair is created inside the node's namespace, its peer moved to the hub
        self._ip("-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", f"h{n}",
                 "netns", self.hub)
        self._ip("-n", ns, "addr", "add", f"{self.address(n)}/24", "dev", "eth0")
        self._ip("-n", ns, "link", "set", "eth0", "up")
        self._ip("-n", self.hub, "link", "set", f"h{n}", "master", "br0")
        self._ip("-n", self.hub, "link", "set", f"h{n}", "up")

    @staticmethod
    def address(n: int) -> str:
        return f"{SUBNET}.{n}"

    def run(self, n: int, argv: list[str]) -> list[str]:
        """`argv` to run inside node n's namespace."""
        return ["ip", "netns", "exec", self.ns[n], *argv]

    def cut(self, n: int) -> None:
        """Node n's cable pulled: its hub port goes down (both directions dead)."""
        self._ip("-n", self.hub, "link", "set", f"h{n}", "down")

    def heal(self, n: int) -> None:
        self._ip("-n", self.hub, "link", "set", f"h{n}", "up")

    @staticmethod
    def _ip(*args: str) -> None:
        r = subprocess.run(["ip", *args], capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"ip {' '.join(args)}: {r.stderr.strip()}")
