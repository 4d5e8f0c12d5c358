"""A node whose event loop stalls while its process runs stays in the cluster (tier 3,
real mounts; comms/beacon.py, membership/detection.py).

On a loaded host a mount's event loop can stop for a second or two (a long garbage
collection, no CPU for it) while its process lives. Another node waiting on it then
suspects it and probes it, and the probe goes unanswered. Before beacons that node was
taken for dead and fenced (killed, its mount gone); now its beacon thread says its
process runs and when its loop last ran, and it is left alone up to the failure
timeout.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import mountutil
import pytest
from clusterutil import cluster
from mountutil import run_cli

from clusterfs.node.cluster import STALL_ENV

pytestmark = pytest.mark.skipif(mountutil.missing_prerequisites() is not None,
                                reason=str(mountutil.missing_prerequisites()))

STALL = 2.6          # under the tests' 3 s failure timeout, over answer + probe (2 s)

WRITER = """
import os, sys
fd = os.open(sys.argv[1], os.O_WRONLY)
os.pwrite(fd, b"from node 1" * 100, 0)
os.fsync(fd)
"""


def status_json(c, node: int) -> dict:
    r = run_cli("status", "--control", c.control(node), "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_a_mount_whose_loop_stalls_is_waited_for_not_fenced(tmp_path, monkeypatch) -> None:
    """Node 2 made a file (its lock cached there); node 2's loop then stalls 2.6 s
    (SIGUSR2 with the test hook) and node 1 writes the file meanwhile: node 1's lock
    request goes unanswered, node 2 is suspected and probed, and the probe unanswered.
    Node 1's write completes once node 2's loop runs again; no node was fenced, the
    view is the one from before, node 2 still serves and reads node 1's bytes."""
    monkeypatch.setenv(STALL_ENV, str(STALL))
    with cluster(tmp_path, nodes=3) as c:
        path2 = c.path(2, "f")
        with open(path2, "wb") as f:
            f.write(b"from node 2" * 1000)
            f.flush()
            os.fsync(f.fileno())
        before = status_json(c, 1)
        os.kill(c.mounts[2].proc.pid, signal.SIGUSR2)
        stalled = time.monotonic()
        time.sleep(0.1)
        r = subprocess.run([sys.executable, "-c", WRITER, c.path(1, "f")], timeout=30,
                           capture_output=True, text=True)
        took = time.monotonic() - stalled
        assert r.returncode == 0, r.stderr
        print(f"\nnode 1's write returned {took:.2f} s after node 2's loop stalled "
              f"for {STALL} s")
        for n in (1, 2, 3):
            assert c.mounts[n].alive(), f"node {n} gone:\n{c.logs()}"
        logs = c.logs()
        assert "stalling the event loop" in c.mounts[2].log_text()
        assert "taken for dead" not in logs and "only stalled" in logs, logs
        after = status_json(c, 1)
        assert after["generation"] == before["generation"], (before, after)
        assert after["members"] == [1, 2, 3]
        spared = sum(status_json(c, n)["detection"]["spared"] for n in (1, 3))
        assert spared >= 1
        with open(path2, "rb") as f:
            assert f.read(11) == b"from node 1"
