"""A clean unmount in a cluster is a leave, not a death (tier 3: three `clusterfs mount`
processes on one loop device).

The unmounting node, once its journal is clean and its locks are released, announces
it is leaving; the others install a view without it at once, fence nothing, replay
nothing, and its vote goes: after two of three nodes unmount cleanly the last one still
writes and fsyncs. The nodes that left mount again and rejoin.
"""

from __future__ import annotations

import subprocess
import sys
import time

import mountutil
import pytest
from clusterutil import cluster, node_status

pytestmark = pytest.mark.skipif(mountutil.missing_prerequisites() is not None,
                                reason=str(mountutil.missing_prerequisites()))

FAILURE_TIMEOUT = 3.0          # clusterutil's config


def write_and_fsync(path: str, data: bytes, timeout: float) -> None:
    """Create, write and fsync `path` from another process (a hang fails, not blocks)."""
    code = ("import os,sys; fd=os.open(sys.argv[1], os.O_WRONLY|os.O_CREAT|os.O_TRUNC, 0o644);"
            "os.write(fd, bytes.fromhex(sys.argv[2])); os.fsync(fd); os.close(fd)")
    subprocess.run([sys.executable, "-c", code, path, data.hex()], check=True,
                   timeout=timeout)


def node_log(c, node: int) -> str:
    with open(c.dir / f"node{node}.clusterfs.log", errors="replace") as f:
        return f.read()


def test_two_clean_unmounts_leave_the_last_node_quorate_without_fencing_or_replay(tmp_path):
    with cluster(tmp_path, nodes=3) as c:
        write_and_fsync(c.path(1, "before"), b"from node 1", 30)
        for n in (1, 2):
            t0 = time.monotonic()
            c.unmount(n)
            # a leave takes a view change, not a failure timeout plus recovery
            assert time.monotonic() - t0 < FAILURE_TIMEOUT + 5, f"unmount of {n} slow"
        assert "members     3\n" in node_status(c, 3)
        assert "quorum      yes" in node_status(c, 3)
        # the last node writes and fsyncs (without the leave it has no quorum: it waits)
        write_and_fsync(c.path(3, "after"), b"from node 3 alone", 20)
        with open(c.path(3, "before"), "rb") as f:
            assert f.read() == b"from node 1"
        st = node_status(c, 3)
        assert "recovery    gen" not in st          # no journal recovery ran
        log3 = node_log(c, 3)
        assert "fencing node" not in log3 and "counted fenced" not in log3
        assert "journal recovery" not in log3
        assert "left [1] (cleanly [1])" in log3 and "left [2] (cleanly [2])" in log3
        for n in (1, 2):
            assert "left: node(s)" in node_log(c, n)     # it saw the view without it
        # the nodes that left mount again and rejoin normally
        c.start(1, 2)
        with open(c.path(2, "after"), "rb") as f:
            assert f.read() == b"from node 3 alone"
        write_and_fsync(c.path(1, "again"), b"rejoined", 30)
        with open(c.path(3, "again"), "rb") as f:
            assert f.read() == b"rejoined"
        assert "members     1 2 3\n" in node_status(c, 2)


def test_a_node_that_cannot_leave_cleanly_is_fenced_and_recovered(tmp_path):
    """The leave is only announced when it is true: a node killed mid-unmount (here:
    simply killed) is still fenced and its journal recovered by the others."""
    with cluster(tmp_path, nodes=3) as c:
        write_and_fsync(c.path(2, "f"), b"x", 30)
        c.kill9(2)
        deadline = time.monotonic() + 30
        while "recovery    gen" not in (st := node_status(c, 1)):
            assert time.monotonic() < deadline, st
            time.sleep(0.2)
        assert "departed [2]" in st
        assert "fencing node 2" in node_log(c, 1)
        c.start(2)
