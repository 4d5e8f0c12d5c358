"""Two-node clusters keep quorum through the disk (tier 3: two `clusterfs mount`
processes on one loop device).

Two nodes are one vote each: a survivor alone holds exactly half. The disk breaks the
tie (membership's quorum-disk tiebreak over the disk heartbeats, format/diskbeat.py):
once the dead node's heartbeat has stopped changing for the failure timeout, the
survivor is quorate, fences the dead node, replays its journal and goes on. Without
the disk path the survivor would wait forever (the first test fails so).
"""

from __future__ import annotations

import os

import mountutil
import pytest
from clusterutil import cluster, wait_node_status
from test_cluster_leave import node_log, write_and_fsync

pytestmark = pytest.mark.skipif(mountutil.missing_prerequisites() is not None,
                                reason=str(mountutil.missing_prerequisites()))


@pytest.mark.parametrize("dead", [1, 2])
def test_the_survivor_of_two_goes_on_after_the_other_dies(tmp_path, dead):
    survivor = 3 - dead
    with cluster(tmp_path, nodes=2) as c:
        data = {f"f{i}": os.urandom(4000 + 77 * i) for i in range(8)}
        for name, blob in data.items():
            write_and_fsync(c.path(dead, name), blob, 30)
        c.kill9(dead)
        wait_node_status(c, survivor, f"members     {survivor}\n")
        # (a first view without it may lack quorum: its disk heartbeat is still fresh)
        wait_node_status(c, survivor, "quorum      yes")
        write_and_fsync(c.path(survivor, "after"), b"the survivor writes", 40)
        for name, blob in data.items():          # the dead node's journal was replayed
            with open(c.path(survivor, name), "rb") as f:
                assert f.read() == blob, name
        assert f"fencing node {dead}" in node_log(c, survivor)
        c.start(dead)                            # it comes back and rejoins
        wait_node_status(c, dead, "members     1 2\n")
        with open(c.path(dead, "after"), "rb") as f:
            assert f.read() == b"the survivor writes"


def test_a_clean_leave_of_one_of_two_needs_no_tiebreak(tmp_path):
    with cluster(tmp_path, nodes=2) as c:
        c.unmount(1)
        st = wait_node_status(c, 2, "members     2\n")
        assert "quorum      yes" in st
        write_and_fsync(c.path(2, "alone"), b"x", 20)
        assert "fencing node" not in node_log(c, 2)
