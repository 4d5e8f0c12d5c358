"""The process fencing agent and a half-dead mount: a killed FUSE server that does not
go away because one of its threads is stuck in the kernel on its own mount.

Real FUSE mounts of tests/halfdead_fuse.py, which records itself as a node exactly
as a clusterfs mount with --fence-pid-dir does (node<ID>.pid, node<ID>.mount). The
agent must abort that node's own connection, and only it: a bystander mount beside
it keeps serving. Before the agent did it, the fence failed (FenceError after
`wait`) and recovery waited for a harness or a human to abort the mount.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from clusterfs.errors import FenceError
from clusterfs.fence.agent import ProcessAgent
from clusterfs.fence.fuseconn import abort_fuse_connection, fuse_mount_at
from clusterfs.fence.pidfile import read_mount_record, read_pid_record

HELPER = Path(__file__).resolve().parent / "halfdead_fuse.py"
ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/fuse") or os.geteuid() != 0,
                                reason="needs /dev/fuse and root")


@dataclass
class FakeNode:
    node_id: int
    incarnation: int
    mountpoint: str
    proc: subprocess.Popen[str]
    conn: int


@contextlib.contextmanager
def fuse_nodes(*specs: tuple[int, bool]) -> Iterator[tuple[str, dict[int, FakeNode]]]:
    """Start one helper per (node id, hang) in a pid dir of their own; on the way out
    kill each by its pid, abort its connection if it lingers, and detach its mount."""
    work = tempfile.mkdtemp(prefix="h7-halfdead-")
    pid_dir = os.path.join(work, "fence")
    nodes: dict[int, FakeNode] = {}
    try:
        for node_id, hang in specs:
            mp = os.path.join(work, f"node{node_id}")
            os.makedirs(mp)
            inc = secrets.randbits(63)
            proc = subprocess.Popen(
                [sys.executable, str(HELPER), mp, pid_dir, str(node_id), f"{inc:x}",
                 *(["--hang"] if hang else [])],
                stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
            line = proc.stdout.readline() if proc.stdout else ""
            nodes[node_id] = FakeNode(node_id, inc, mp, proc, -1)
            assert line.startswith("ready"), f"helper for node {node_id} did not start"
            nodes[node_id].conn = int(line.split()[1])
        yield pid_dir, nodes
    finally:
        for node in nodes.values():
            _get_rid_of(node)
        with contextlib.suppress(OSError):
            for node in nodes.values():
                os.rmdir(node.mountpoint)
        subprocess.run(["rm", "-rf", work], check=False)


def _get_rid_of(node: FakeNode) -> None:
    if node.proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            node.proc.send_signal(signal.SIGKILL)
        try:
            node.proc.wait(2)
        except subprocess.TimeoutExpired:
            mount = fuse_mount_at(node.mountpoint)
            if mount is not None and mount.conn == node.conn:
                abort_fuse_connection(node.conn)
            node.proc.wait(10)
    if fuse_mount_at(node.mountpoint) is not None:
        subprocess.run(["fusermount3", "-u", "-z", node.mountpoint], capture_output=True)


def fence(agent: ProcessAgent, node: FakeNode) -> None:
    trio.run(agent.fence, node.node_id, 7, node.incarnation)


def test_the_agent_aborts_a_half_dead_nodes_own_mount_and_no_other():
    with fuse_nodes((3, True), (4, False)) as (pid_dir, nodes):
        victim, bystander = nodes[3], nodes[4]
        assert read_pid_record(pid_dir, 3).process.pid == victim.proc.pid
        assert read_mount_record(pid_dir, 3).mount == fuse_mount_at(victim.mountpoint)
        agent = ProcessAgent(pid_dir=pid_dir, wait=5.0, abort_after=0.5)
        fence(agent, victim)       # old agent: FenceError, pid still alive 5 s after SIGKILL
        assert agent.aborted == [(3, victim.conn)]
        assert victim.proc.wait(5) == -signal.SIGKILL
        # the bystander's mount is untouched and still serves
        assert fuse_mount_at(bystander.mountpoint).conn == bystander.conn
        assert os.stat(bystander.mountpoint).st_ino == 1
        assert bystander.proc.poll() is None


def test_a_mount_record_of_another_process_is_never_aborted():
    """The record must name the very process being fenced: a record left by another
    process (here: the bystander's mount, claimed for node 3) is not acted on."""
    with fuse_nodes((3, True), (4, False)) as (pid_dir, nodes):
        victim, bystander = nodes[3], nodes[4]
        other = read_mount_record(pid_dir, 4)
        # node 3's mount record, forged to point at node 4's mount and process
        path = Path(pid_dir) / "node3.mount"
        path.write_text(path.read_text().replace(str(victim.proc.pid), str(other.process.pid))
                        .replace(f'"conn": {victim.conn}', f'"conn": {other.mount.conn}'))
        agent = ProcessAgent(pid_dir=pid_dir, wait=1.5, abort_after=0.5)
        with pytest.raises(FenceError):
            fence(agent, victim)
        assert agent.aborted == []
        assert os.stat(bystander.mountpoint).st_ino == 1


def test_a_mount_gone_from_mountinfo_is_not_aborted():
    """A record whose mount is no longer there (another mount id or connection at
    that path, or none) is not acted on: the number may be someone else's now."""
    with fuse_nodes((3, True)) as (pid_dir, nodes):
        victim = nodes[3]
        rec = read_mount_record(pid_dir, 3)
        stale = type(rec.mount)(rec.mount.mount_id + 100000, rec.mount.conn,
                                rec.mount.mountpoint)
        # rewrite it as the victim would have (same process), with a stale mount id
        _rewrite_as(pid_dir, 3, rec, stale)
        agent = ProcessAgent(pid_dir=pid_dir, wait=1.5, abort_after=0.5)
        with pytest.raises(FenceError):
            fence(agent, victim)
        assert agent.aborted == []


def _rewrite_as(pid_dir: str, node_id: int, rec, mount) -> None:
    import json

    path = Path(pid_dir) / f"node{node_id}.mount"
    data = json.loads(path.read_text())
    data.update(mount_id=mount.mount_id, conn=mount.conn, mountpoint=mount.mountpoint)
    path.write_text(json.dumps(data))



def wait_mount_record(pid_dir: str, node_id: int, within: float = 20.0):
    """node_id's mount record once written: the harness counts a node mounted when
    mountinfo shows its mount, a moment before the node records it (CI saw the gap)."""
    deadline = time.monotonic() + within
    while True:
        try:
            return read_mount_record(pid_dir, node_id)
        except FenceError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def test_a_real_cluster_mount_records_its_own_fuse_mount(tmp_path):
    """Each clusterfs mount with --fence-pid-dir records its FUSE mount, as its own
    mountinfo shows it, for its own process; fencing a node that dies at once (the
    usual kill) aborts nothing."""
    from clusterutil import cluster

    with cluster(tmp_path, nodes=3) as c:
        fence_dir = str(tmp_path / "fence")
        for n in c.node_ids:
            rec = wait_mount_record(fence_dir, n)
            assert rec.process.pid == c.mounts[n].pid
            assert rec.process == read_pid_record(fence_dir, n).process
            assert rec.mount == fuse_mount_at(c.mountpoint(n))
        victim = read_pid_record(fence_dir, 3)
        agent = ProcessAgent(pid_dir=fence_dir, abort_after=0.5)
        trio.run(agent.fence, 3, 99, victim.incarnation)
        assert agent.aborted == []
        c.kill9(3)             # (already dead: detaches its mount)
