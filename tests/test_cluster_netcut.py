"""Quorum loss and expulsion of mounted nodes cut off the network for real (tier 4).

Three `clusterfs mount` processes on one loop device, each in its own network
namespace (tests/netns.py), joined by a bridge; syscalls come from this process.

* Two nodes cut off: every node is alone, none has quorum. The write on node 1 waits
  (neither fails nor reaches the disk: the device's bytes do not change); once the
  links are back the three merge (none was quorate, so nobody is fenced) and the write
  lands.
* One node cut off (no fencing agent, so it lives to hear about it): the other two
  form a quorate view, replay its journal and read what it fsync'd; when the link is
  back it is told it was expelled and withdraws (every call EIO), `clusterfs umount`
  works, and it rejoins only after a clean restart.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import subprocess
import time
from pathlib import Path

import mountutil
import netns
import pytest
from clusterutil import node_status, wait_node_status
from mountutil import CLUSTERFS, MOUNT_TIMEOUT, Mount, run_cli
from test_cluster_quorum import BEATS, device_digest, start_writer

CLUSTER = "netcutfs"
PORT = 7410


@pytest.fixture
def lab():
    mountutil.require_mounts()
    mountutil.require(netns.missing())
    with netns.NetLab(3) as lab:
        yield lab


@pytest.fixture
def lab2():
    mountutil.require_mounts()
    mountutil.require(netns.missing())
    with netns.NetLab(2) as lab:
        yield lab


class NetCluster:
    """Mounts of one device, node n running inside lab namespace n."""

    def __init__(self, lab: netns.NetLab, directory: Path, device: str,
                 fence: bool) -> None:
        self.lab, self.dir, self.device, self.fence = lab, directory, device, fence
        self.config = directory / "cluster.toml"
        lines = [f'name = "{CLUSTER}"', f'key = "{secrets.token_hex(32)}"', "",
                 "[timeouts]", "heartbeat_interval = 0.5", "failure_timeout = 3.0",
                 "connect_timeout = 1.0", ""]
        for n in lab.ns:
            lines += ["[[node]]", f"id = {n}", f'address = "{lab.address(n)}:{PORT}"', ""]
        self.config.write_text("\n".join(lines))
        self.mounts: dict[int, Mount] = {}

    def path(self, n: int, *parts: str) -> str:
        return os.path.join(self.dir, f"node{n}", *parts)

    def control(self, n: int) -> str:
        return str(self.dir / f"node{n}.sock")

    def start(self, *nodes: int) -> None:
        for n in nodes:
            self.mounts[n] = self._spawn(n)
        deadline = time.monotonic() + MOUNT_TIMEOUT
        for n in nodes:
            while not mountutil._is_mounted(self.path(n)):
                m = self.mounts[n]
                assert m.alive(), f"node {n} exited:\n{m.log_text()[-3000:]}"
                assert time.monotonic() < deadline, f"node {n}:\n{m.log_text()[-3000:]}"
                time.sleep(0.1)

    def _spawn(self, n: int) -> Mount:
        mnt = self.path(n)
        os.makedirs(mnt, exist_ok=True)
        argv = [*CLUSTERFS, "mount", "-f", "--config", str(self.config), "--node-id", str(n),
                "--state-dir", str(self.dir), "--control", self.control(n)]
        if self.fence:
            argv += ["--fence-pid-dir", str(self.dir / "fence")]
        log = str(self.dir / f"node{n}.log")
        logf = open(log, "ab")  # noqa: SIM115 - closed by Mount._forget
        # nsenter, not `ip netns exec`: that one also makes a mount namespace of its
        # own, and the FUSE mount would be invisible here
        enter = ["nsenter", f"--net=/var/run/netns/{self.lab.ns[n]}"]
        proc = subprocess.Popen([*enter, *argv, self.device, mnt],
                                stdin=subprocess.DEVNULL, stdout=logf,
                                stderr=subprocess.STDOUT, start_new_session=True)
        m = Mount(fs="clusterfs", device=self.device, mountpoint=os.path.realpath(mnt),
                  log=log, proc=proc, _logf=logf)
        mountutil._REGISTRY.add_mount(m)
        return m

    def status(self, n: int) -> str:
        return node_status(self, n)

    def wait_status(self, n: int, text: str, within: float = 40) -> str:
        return wait_node_status(self, n, text, within)

    def log(self, n: int) -> str:
        with open(self.dir / f"node{n}.log", errors="replace") as f:
            return f.read()


@contextlib.contextmanager
def net_cluster(lab, tmp_path, fence: bool):
    with mountutil.loop_device(512 << 20, tmp_path) as dev:
        r = run_cli("mkfs", "-q", "-j", str(len(lab.ns)), "--cluster", CLUSTER, dev)
        assert r.returncode == 0, r.stderr
        c = NetCluster(lab, tmp_path, dev, fence)
        try:
            c.start(*lab.ns)
            yield c
            for m in list(c.mounts.values()):
                m.unmount(timeout=60)
        finally:
            for m in c.mounts.values():
                m.force_unmount()
        r = mountutil.fsck(dev)
        assert r.returncode == 0, f"fsck:\n{r.stdout}{r.stderr}"


def test_two_nodes_cut_off_nobody_writes_then_all_merge(lab, tmp_path):
    with net_cluster(lab, tmp_path, fence=True) as c:
        w = start_writer(c.path(1, "before"), b"quorate")
        assert w.wait(30) == 0
        blob = os.urandom(40_000)
        lab.cut(2)
        lab.cut(3)
        try:
            for n in (1, 2, 3):
                c.wait_status(n, "quorum      NO")
            time.sleep(1)
            before = device_digest(c.device, BEATS)
            writer = start_writer(c.path(1, "during"), blob)
            time.sleep(8)
            assert writer.poll() is None, writer.communicate()[0]
            assert device_digest(c.device, BEATS) == before, "a node without quorum wrote"
        finally:
            lab.heal(2)
            lab.heal(3)
        assert writer.wait(60) == 0, writer.communicate()[0]
        for n in (1, 2, 3):
            c.wait_status(n, "members     1 2 3\n")
            assert c.mounts[n].alive()
        with open(c.path(3, "during"), "rb") as f:
            assert f.read() == blob
        assert "fencing node" not in c.log(1) + c.log(2) + c.log(3)


def test_an_expelled_node_withdraws_unmounts_and_rejoins_after_a_restart(lab, tmp_path):
    with net_cluster(lab, tmp_path, fence=False) as c:
        os.mkdir(c.path(3, "d"))
        data = {f"f{i}": os.urandom(3000 + 101 * i) for i in range(10)}
        for name, blob in data.items():
            w = start_writer(c.path(3, "d", name), blob)
            assert w.wait(30) == 0
        lab.cut(3)
        try:
            st = c.wait_status(1, "members     1 2\n")
            c.wait_status(1, "recovery    gen")
            assert "departed [3]" in c.status(1)
            for name, blob in data.items():       # its journal was replayed first
                with open(c.path(2, "d", name), "rb") as f:
                    assert f.read() == blob, name
            c.wait_status(3, "quorum      NO")
        finally:
            lab.heal(3)
        deadline = time.monotonic() + 30
        while "EXPELLED" not in c.log(3):
            assert time.monotonic() < deadline, c.log(3)[-3000:]
            time.sleep(0.2)
        # withdrawn: every call fails with EIO, none hangs (each from its own process)
        for code in ("os.stat(p)", "os.listdir(p)", "open(p + '/new', 'wb').write(b'x')",
                     "open(p + '/d/f1', 'rb').read()"):
            r = subprocess.run([*CLUSTERFS[:1], "-c",
                                f"import os,sys; p=sys.argv[1]\ntry:\n {code}\n"
                                f"except OSError as e: sys.exit(e.errno)",
                                c.path(3)], timeout=20)
            assert r.returncode == errno.EIO, (code, r.returncode)
        assert "members     1 2\n" in c.status(1)     # never merged back
        m = c.mounts.pop(3)
        r = run_cli("umount", c.path(3), timeout=60)
        assert r.returncode == 0, r.stderr
        m.proc.wait(10)
        m.force_unmount()
        c.start(3)                                     # a clean restart rejoins
        c.wait_status(1, "members     1 2 3\n")
        with open(c.path(3, "d", "f4"), "rb") as f:
            assert f.read() == data["f4"]
        del st


def test_a_two_node_split_lets_only_the_disk_race_winner_write(lab2, tmp_path):
    """Two nodes, the link between them cut (no fencing agent, so the loser lives to
    show it): both still see the disk, so both see each other's disk heartbeat; the
    tiebreak gives the lower id the quorum. Node 1 writes and fsyncs; node 2 has no
    quorum, its write waits; reconnected, node 2 is expelled (EIO), restarts, rejoins."""
    with net_cluster(lab2, tmp_path, fence=False) as c:
        lab2.cut(2)
        try:
            c.wait_status(1, "members     1\n")
            assert "quorum      yes" in c.wait_status(1, "locking     running")
            c.wait_status(2, "quorum      NO")
            loser = start_writer(c.path(2, "loser"), b"must not land")
            winner = start_writer(c.path(1, "winner"), b"disk race won")
            assert winner.wait(30) == 0, winner.communicate()[0]
            time.sleep(6)
            assert loser.poll() is None, loser.communicate()[0]     # waits, not written
            assert "quorum      NO" in c.status(2)
        finally:
            lab2.heal(2)
        loser.wait(60)
        assert loser.returncode != 0, "the loser's write landed"
        deadline = time.monotonic() + 30
        while "EXPELLED" not in c.log(2):
            assert time.monotonic() < deadline, c.log(2)[-3000:]
            time.sleep(0.2)
        m = c.mounts.pop(2)
        r = run_cli("umount", c.path(2), timeout=60)
        assert r.returncode == 0, r.stderr
        m.proc.wait(10)
        m.force_unmount()
        c.start(2)
        c.wait_status(1, "members     1 2\n")
        with open(c.path(2, "winner"), "rb") as f:
            assert f.read() == b"disk race won"
        assert not os.path.exists(c.path(1, "loser"))
