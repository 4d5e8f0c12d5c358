"""Real-mount clusters with proxy I/O (tests/test_proxy.py, tests/test_hung_disk_mount.py):
nodes 1 and 2 reach the loop device directly and serve it (the storage group); node 3
has no path of its own (the config leaves it out of the group) and mounts through them.
Every node is its own `clusterfs mount` process.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import os
import signal
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

import mountutil
from clusterutil import CLUSTER_NAME, Cluster, free_ports, write_config
from mountutil import run_cli

MIB = 1 << 20
IO_TIMEOUT = 0.5

# device -> the nodes that reach it by a path of their own (made once the device is
# formatted; entered for the cluster's life, left after its last unmount and fsck)
OwnPaths = Callable[[str], dict[int, AbstractContextManager[str]]]


def proxy_config(directory: Path, storage: str = "", io_timeout: float = IO_TIMEOUT) -> Path:
    """`storage`: more lines of its [storage] table."""
    config = write_config(directory, 3)
    p1, p2 = free_ports(2)
    config.write_text(config.read_text() + f"""
[storage]
group = [1, 2]
io_timeout = {io_timeout}
{storage}

[storage.servers]
1 = "127.0.0.1:{p1}"
2 = "127.0.0.1:{p2}"
""")
    return config


class ProxyCluster:
    """Nodes 1 and 2 serve, node 3 proxies; all unmounted (fsck clean) at the end.
    `own_paths`: servers that reach the disk by another path than the cluster's loop
    device (its image, reached another way); `storage`: more lines of the config's
    [storage] table."""

    def __init__(self, directory: Path, own_paths: OwnPaths | None = None,
                 storage: str = "", io_timeout: float = IO_TIMEOUT) -> None:
        self.directory = directory
        self.own_paths = own_paths
        self.storage = storage
        self.io_timeout = io_timeout

    def __enter__(self) -> Cluster:
        self._stack = contextlib.ExitStack()
        try:
            dev = self._stack.enter_context(mountutil.loop_device(512 * MIB, self.directory))
            r = run_cli("mkfs", "-q", "-j", "3", "--cluster", CLUSTER_NAME, dev)
            assert r.returncode == 0, r.stderr
            self.c = Cluster(self.directory, dev, proxy_config(self.directory, self.storage,
                                                                 self.io_timeout), 3)
            for node, path in (self.own_paths(dev) if self.own_paths else {}).items():
                self.c.devices[node] = self._stack.enter_context(path)
        except BaseException:
            self._stack.close()
            raise
        try:
            self.c.start(1, 2)
            self.c.start(3)
        except BaseException:
            self._abort()
            raise
        return self.c

    def _abort(self) -> None:
        for _n, m in sorted(self.c.mounts.items(), reverse=True):   # the proxy first
            os.kill(m.pid, signal.SIGCONT) if m.alive() else None
            m.force_unmount()
        self._stack.close()

    def __exit__(self, kind, exc, tb) -> None:
        if kind is not None:
            self._abort()
            return
        try:
            self.c.unmount(3)
            self.c.unmount_all()
        except BaseException:
            self._abort()
            raise
        r = mountutil.fsck(self.c.device)
        self._stack.close()
        assert r.returncode == 0, f"fsck after the proxy test:\n{r.stdout}{r.stderr}"


def status(c: Cluster, node: int) -> dict:
    r = run_cli("status", "--control", c.control(node), "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def blob(seed: str, n: int) -> bytes:
    out = bytearray()
    i = 0
    while len(out) < n:
        out += hashlib.blake2b(f"{seed}/{i}".encode(), digest_size=64).digest()
        i += 1
    return bytes(out[:n])


# the child scripts of the tests write blob's data: they get its source, so the
# tests' expectations and what they wrote come from one definition
BLOB = inspect.getsource(blob)


def wait_view(c: Cluster, node: int, members: list[int], within: float = 60) -> dict:
    deadline = time.monotonic() + within
    while True:
        st = status(c, node)
        if st["members"] == members and st["running"]:
            return st
        assert time.monotonic() < deadline, (st["members"], c.logs())
        time.sleep(0.2)


def wait_fenced(c: Cluster, server: int, within: float = 60) -> float:
    """The survivors fence a server that stopped (the dev cluster's agent kills it,
    and finds it gone): wait until its process is gone, detach its dead mount.
    Returns when it was seen gone (time.time(), polled every 0.2 s)."""
    victim = c.mounts[server]
    deadline = time.monotonic() + within
    while victim.alive() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not victim.alive(), c.logs()
    gone = time.time()
    c.mounts.pop(server).clean_after_crash()
    return gone
