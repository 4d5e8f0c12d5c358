"""Fencing wired into `clusterfs mount` (issue 8, item 4), with real mounts.

Three `clusterfs mount` processes share one device and fence through the agent the
config names (no --fence-pid-dir: nothing kills anyone). A writer on node 3 has a
file open; node 3 is SIGSTOPped; the survivors remove it, fence it (SCSI-3 PREEMPT
on a tgtd LUN, or a poison pill on a loop device), replay its journal and serve.
Then the writer writes a fresh pattern and fsyncs, and node 3 is let go: the
target (scsi-pr) or node 3 itself (poison pill) refuses those writes, node 3
withdraws and the writer gets EIO, and the pattern is nowhere on the disk.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import iscsiutil
import mountutil
import pytest
from clusterutil import CLUSTER_NAME, Cluster, write_config
from mountutil import run_cli

MIB = 1 << 20
BEFORE = b"fsynced-before-the-stop:" * 1000
STALE = b"STALE-WRITE-AFTER-FENCE!" * 1000

WRITER = r"""
import os, sys
path = sys.argv[1]
fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
os.write(fd, bytes.fromhex(sys.argv[2])); os.fsync(fd)
print("ready", flush=True)
sys.stdin.readline()
try:
    os.write(fd, bytes.fromhex(sys.argv[3])); os.fsync(fd)
    print("ok", flush=True)
except OSError as exc:
    print("error", exc.errno, flush=True)
"""


class FencedCluster(Cluster):
    """A Cluster whose nodes fence through the config's [fencing] agent."""

    def args(self, node: int) -> list[str]:
        return ["--config", str(self.config), "--node-id", str(node), "--state-dir",
                str(self.dir), "--control", self.control(node)]


def _config(directory: Path, fencing: str) -> Path:
    config = write_config(directory, 3)
    config.write_text(config.read_text() + "\n[fencing]\n" + fencing)
    return config


def _wait(what: str, check, timeout: float = 60.0, logs=lambda: "") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}\n{logs()}")
        time.sleep(0.1)


def _start_writer(c: Cluster, node: int = 3) -> subprocess.Popen:
    w = subprocess.Popen([sys.executable, "-c", WRITER, c.path(node, "victim"), BEFORE.hex(),
                          STALE.hex()], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         text=True)
    assert w.stdout.readline().strip() == "ready", c.logs()
    return w


def _stop_fence_resume(c: Cluster, fenced, backing: Path, victim_id: int = 3) -> None:
    """The scenario (module doc); `fenced()` tells when node `victim_id` is fenced."""
    writer = _start_writer(c, victim_id)
    victim = c.mounts[victim_id]
    one, two = (n for n in (1, 2, 3) if n != victim_id)
    try:
        os.kill(victim.pid, signal.SIGSTOP)
        _wait(f"node {victim_id} fenced", fenced, logs=c.logs)
        with open(c.path(one, "victim"), "rb") as f:   # replayed by the survivors
            assert f.read() == BEFORE
        with open(c.path(two, "after"), "wb") as f:   # and they serve
            f.write(b"survivors")
            f.flush()
            os.fsync(f.fileno())
        with open(c.path(one, "after"), "rb") as f:
            assert f.read() == b"survivors"
        writer.stdin.write("go\n")
        writer.stdin.flush()
        time.sleep(0.3)                               # the write waits in the kernel
        os.kill(victim.pid, signal.SIGCONT)
        out, _ = writer.communicate(timeout=60)
    finally:
        os.kill(victim.pid, signal.SIGCONT)
        if writer.poll() is None:
            writer.kill()
    assert out.split()[:2] == ["error", "5"], f"{out!r}\n{c.logs()}"   # EIO
    log = victim.log_text()
    # Woken, node 3 has two things to handle at once: the writer's request and the
    # news that it was expelled (which fails every operation that must ask the DLM
    # for a lock). Usually the write goes out under locks it still caches and is
    # refused as fenced; when the expulsion comes first the write never leaves the
    # node (CI saw that once). Either way it withdraws and nothing stale lands.
    assert ("refusing every write and withdrawing" in log
            or "this node was expelled; lockspace withdrawn" in log), log[-3000:]
    assert STALE[:48] not in backing.read_bytes()     # nothing stale reached the disk


def registered_nodes(observer) -> list[int | None]:
    """The node each key registered on the LUN names, sorted (keys are per session:
    the node's key with a tag of its own, clusterfs.fence.scsi_pr)."""
    from clusterfs.fence.scsi_pr import node_of_key

    return sorted(node_of_key(CLUSTER_NAME, k) for k in observer.pr_read_keys())


def _finish(c: Cluster, victim: int = 3, survivors: tuple[int, ...] = (1, 2)) -> None:
    c.mounts.pop(victim).clean_after_crash()
    for n in survivors:                               # a proxy before its servers
        c.unmount(n)


@pytest.fixture
def prereq_iscsi():
    mountutil.require(iscsiutil.missing_prerequisites())


@contextlib.contextmanager
def scsi_pr_cluster(tmp_path: Path, size: int = 256 * MIB,
                    config: Callable[[str], Path] | None = None
                    ) -> Iterator[tuple[FencedCluster, Any, Any]]:
    """A tgtd LUN of `size` made for three nodes, a FencedCluster on it fencing by
    scsi-pr (`config(url)` writes another config), and an observer session reading the
    LUN's registrations: (cluster, observer, target); the caller starts the nodes.
    At the end the observer is closed and, if the body ended normally, the LUN is
    fsck'd clean."""
    from clusterfs.storage.iscsi import IscsiDevice

    with iscsiutil.target([size]) as t:
        url = t.url()
        r = run_cli("mkfs", "-q", "-j", "3", "--cluster", CLUSTER_NAME, url)
        assert r.returncode == 0, r.stderr
        path = config(url) if config is not None else \
            _config(tmp_path, f'agent = "scsi-pr"\ndevices = ["{url}"]\n')
        c = FencedCluster(tmp_path, url, path, 3)
        observer = IscsiDevice(url, timeout=10, initiator="iqn.2025-01.io.clusterfs.test:obs")
        try:
            yield c, observer, t
        finally:
            observer.close()
        r = mountutil.fsck(url)
        assert r.returncode == 0, r.stdout + r.stderr


def test_scsi_pr_mount_registers_and_a_stopped_node_is_preempted(tmp_path, prereq_iscsi):
    with scsi_pr_cluster(tmp_path) as (c, observer, t), c.forced_down_on_error():
        c.start(1, 2, 3)
        # every node registered its mount's session, its agent's and its disk
        # heartbeat's: 3 each, a key of its own each
        assert registered_nodes(observer) == [1, 1, 1, 2, 2, 2, 3, 3, 3]
        assert len(set(observer.pr_read_keys())) == 9
        _stop_fence_resume(c, lambda: 3 not in registered_nodes(observer), t.backing[1])
        assert "reservation conflict: this node was fenced" in c.mounts[3].log_text()
        assert "node 3 fenced: key" in c.logs()
        _finish(c)


def test_poison_pill_mount_claims_a_slot_and_a_stopped_node_stops_itself(tmp_path):
    mountutil.require_mounts()
    with mountutil.loop_device(256 * MIB, tmp_path) as dev:
        r = run_cli("mkfs", "-q", "-j", "3", "--cluster", CLUSTER_NAME, dev)
        assert r.returncode == 0, r.stderr
        config = _config(tmp_path, 'agent = "poison-pill"\ninterval = 0.5\ntimeout = 1.0\n'
                                   'msgwait = 2.0\n')
        c = FencedCluster(tmp_path, dev, config, 3)
        with c.forced_down_on_error():
            c.start(1, 2, 3)
            for n in (1, 2, 3):
                assert "pill watcher every 0.5 s" in c.mounts[n].log_text()
            _stop_fence_resume(c, lambda: "node 3 fenced: its watcher" in c.logs(),
                               tmp_path / "disk.img")
            assert "poison pill from node" in c.mounts[3].log_text()
            _finish(c)
        r = mountutil.fsck(dev)
        assert r.returncode == 0, r.stdout + r.stderr


# -- scsi-pr with proxy I/O: a node without a path to the LUN -----------------------
def _proxy_config(directory: Path, url: str, group: tuple[int, int]) -> Path:
    from clusterfs.comms.localcluster import free_ports

    config = _config(directory, f'agent = "scsi-pr"\ndevices = ["{url}"]\n')
    p = free_ports(2)
    servers = "\n".join(f'{n} = "127.0.0.1:{port}"' for n, port in zip(group, p, strict=True))
    config.write_text(config.read_text() + f"""
[storage]
group = [{group[0]}, {group[1]}]
io_timeout = 0.5

[storage.servers]
{servers}
""")
    return config


def _proxy_scsi_pr(tmp_path: Path, group: tuple[int, int], proxy: int, scenario) -> None:
    """A tgtd LUN, scsi-pr fencing, nodes `group` mount it and serve it, `proxy`
    mounts through them; `scenario(c, observer, target)` runs in between."""
    with scsi_pr_cluster(tmp_path, config=lambda url: _proxy_config(tmp_path, url, group)
                         ) as (c, observer, t), c.forced_down_on_error():
        c.start(*group)
        c.start(proxy)
        assert "reaching it through the storage group" in c.mounts[proxy].log_text()
        registered = registered_nodes(observer)
        # a registration belongs to a session (I_T nexus): the proxy has none
        assert proxy not in registered
        assert all(n in registered for n in group)
        scenario(c, observer, t)


def test_scsi_pr_a_stopped_proxy_node_is_cut_off_at_the_servers(tmp_path, prereq_iscsi):
    """Nodes 1 and 2 serve the LUN, node 3 proxies. Node 3 is stopped: the
    coordinator fences it where its writes go (both block servers cut it off,
    waiting for its writes in flight), the survivors replay its journal, and once
    let go node 3's write is refused by the servers: it withdraws, the writer gets
    EIO, nothing stale reaches the LUN."""
    def scenario(c, observer, t):
        _stop_fence_resume(c, lambda: "node 3 fenced: cut off at block server(s) [1, 2]"
                           in c.mounts[1].log_text(), t.backing[1])
        assert "node 3 was fenced in generation" in c.mounts[3].log_text()
        for n in (1, 2):
            assert "block server cuts node 3 off" in c.mounts[n].log_text()
        _finish(c)

    _proxy_scsi_pr(tmp_path, (1, 2), 3, scenario)


def test_scsi_pr_a_proxy_coordinator_has_a_server_preempt_the_dead(tmp_path,
                                                                   prereq_iscsi):
    """Nodes 2 and 3 serve the LUN, node 1 proxies and, as the lowest id, coordinates.
    Server 2 is stopped: node 1 has no session to PREEMPT through, so it asks server 3,
    which preempts node 2's key with its own; let go, node 2's write meets the
    reservation conflict, it withdraws and the writer gets EIO."""
    def scenario(c, observer, t):
        _stop_fence_resume(c, lambda: 2 not in registered_nodes(observer),
                           t.backing[1], victim_id=2)
        assert "fenced on the disk by block server 3 for us" in c.mounts[1].log_text()
        assert "reservation conflict: this node was fenced" in c.mounts[2].log_text()
        assert 3 in registered_nodes(observer)
        _finish(c, victim=2, survivors=(1, 3))

    _proxy_scsi_pr(tmp_path, (2, 3), 1, scenario)
