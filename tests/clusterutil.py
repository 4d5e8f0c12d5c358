"""Several clusterfs nodes on one loop device, each its own `clusterfs mount -f --config`
process on 127.0.0.1 (tier 3). Built on mountutil: every node is a registered Mount, so
whatever a failing test leaves behind is torn down at session end.

    with cluster(tmp_path, nodes=3) as c:
        c.path(1, "f")          # a path on node 1's mount
        c.kill9(2)              # node 2 dies (its dead mount detached)
        c.start(2)              # and comes back
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import mountutil
from mountutil import MOUNT_TIMEOUT, Mount, run_cli

from clusterfs.comms.localcluster import free_ports

CLUSTER_NAME = "testcl"


def write_config(directory: Path, nodes: int, name: str = CLUSTER_NAME) -> Path:
    key = directory / "cluster.key"
    r = run_cli("keygen", "-o", str(key))
    assert r.returncode == 0, r.stderr
    lines = [f'name = "{name}"', 'key_file = "cluster.key"', "",
             "[timeouts]", "heartbeat_interval = 0.5", "failure_timeout = 3.0", ""]
    for i, port in enumerate(free_ports(nodes), start=1):
        lines += ["[[node]]", f"id = {i}", f'address = "127.0.0.1:{port}"', ""]
    config = directory / "cluster.toml"
    config.write_text("\n".join(lines))
    return config


class Cluster:
    def __init__(self, directory: Path, device: str, config: Path, nodes: int,
                 options: str = "") -> None:
        self.dir = directory
        self.device = device
        self.config = config
        self.node_ids = list(range(1, nodes + 1))
        self.options = options
        self.mounts: dict[int, Mount] = {}
        # a node that reaches the disk by another path than `device` (the same image
        # through another loop device): node -> its path
        self.devices: dict[int, str] = {}

    def mountpoint(self, node: int) -> str:
        return str(self.dir / f"node{node}")

    def path(self, node: int, *parts: str) -> str:
        return os.path.join(self.mountpoint(node), *parts)

    def control(self, node: int) -> str:
        return str(self.dir / f"node{node}.sock")

    def args(self, node: int) -> list[str]:
        extra = ["--config", str(self.config), "--node-id", str(node),
                 "--fence-pid-dir", str(self.dir / "fence"), "--state-dir", str(self.dir),
                 "--control", self.control(node)]
        return extra + (["-o", self.options] if self.options else [])

    @contextlib.contextmanager
    def forced_down_on_error(self) -> Iterator[None]:
        """For the body of a test that starts nodes: if it fails, every mount is forced
        down before the error goes on (nothing of the test's is left mounted)."""
        try:
            yield
        except BaseException:
            self.dump_states()
            for m in self.mounts.values():
                m.force_unmount()
            raise

    def dump_states(self) -> None:
        """Each live node's status with its glocks and every task's wait frames, into
        DIR/nodeN.state.txt: what a hang looked like, kept with the test's directory."""
        for n, m in self.mounts.items():
            if not m.alive():
                continue
            try:
                r = run_cli("status", "--tasks", "--control", self.control(n), timeout=15)
                text = r.stdout + r.stderr
            except subprocess.TimeoutExpired:
                text = "no answer within 15 s\n"
            (self.dir / f"node{n}.state.txt").write_text(text)

    def start(self, *nodes: int) -> None:
        """Start the nodes at once (a lone node of three has no quorum and would wait)
        and return when every one is mounted."""
        for n in nodes:
            self.mounts[n] = mountutil.start_mount(self.devices.get(n, self.device),
                                                   self.mountpoint(n),
                                                   extra_args=self.args(n), wait=False)
        deadline = time.monotonic() + MOUNT_TIMEOUT
        for n in nodes:
            m = self.mounts[n]
            while not mountutil._is_mounted(m.mountpoint):
                if not m.alive():
                    raise AssertionError(f"node {n} exited ({m.proc.returncode}) before "
                                         f"mounting; log:\n{m.log_text()}")
                if time.monotonic() > deadline:
                    raise AssertionError(f"node {n} not mounted after {MOUNT_TIMEOUT}s; "
                                         f"log:\n{m.log_text()}")
                time.sleep(0.05)

    def kill9(self, node: int) -> None:
        """Node death: SIGKILL its process and detach its dead mount."""
        self.mounts.pop(node).clean_after_crash()

    def unmount(self, node: int) -> None:
        self.mounts.pop(node).unmount(timeout=60)

    def unmount_all(self) -> None:
        for n in list(self.mounts):
            self.unmount(n)

    def logs(self) -> str:
        return "\n".join(f"--- node {n}\n{m.log_text()[-4000:]}" for n, m in self.mounts.items())


@contextlib.contextmanager
def cluster(directory: Path, nodes: int = 3, size: int = 512 << 20, journals: int | None = None,
            start: bool = True, options: str = "", mkfs_args: tuple[str, ...] = ()
            ) -> Iterator[Cluster]:
    """A formatted cluster device with `nodes` configured nodes (all started unless
    start=False); every node unmounted cleanly at the end, fsck clean required."""
    with mountutil.loop_device(size, directory) as dev:
        r = run_cli("mkfs", "-q", "-j", str(journals or nodes), "--cluster", CLUSTER_NAME,
                    *mkfs_args, dev)
        assert r.returncode == 0, r.stderr
        c = Cluster(directory, dev, write_config(directory, nodes), nodes, options)
        with c.forced_down_on_error():
            if start:
                c.start(*c.node_ids)
            yield c
            c.unmount_all()
        r = mountutil.fsck(dev)
        assert r.returncode == 0, f"fsck after the cluster test:\n{r.stdout}{r.stderr}"


def node_status(c, node: int) -> str:
    """`clusterfs status` of a node (anything with control(node): a Cluster, NetCluster)."""
    r = run_cli("status", "--control", c.control(node))
    assert r.returncode == 0, r.stderr
    return r.stdout


def wait_node_status(c, node: int, text: str, within: float = 40) -> str:
    """The node's status once it shows `text`; fails after `within` seconds."""
    deadline = time.monotonic() + within
    while text not in (st := node_status(c, node)):
        assert time.monotonic() < deadline, f"node {node}: no {text!r} in:\n{st}"
        time.sleep(0.2)
    return st
