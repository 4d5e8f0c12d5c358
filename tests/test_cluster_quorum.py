"""Quorum loss on real node processes (tier 3/4: `clusterfs mount` processes on one
loop device, syscalls from other processes).

Of three mounted nodes, two are cut off: SIGSTOPped here (the netns cut is in
test_cluster_netcut.py). The lone node has no quorum: a write on it waits, it neither
fails nor reaches the disk (the device's bytes do not change); once the two wake up
the three go on together and the write lands. And one node dies while another
freezes: the lone survivor begins its recovery without quorum, and finishes it with
the other once that one wakes.
"""

from __future__ import annotations

import contextlib
import hashlib
import mmap
import os
import signal
import subprocess
import sys
import time

import mountutil
import pytest
from clusterutil import cluster, node_status, wait_node_status
from recoveryutil import (
    StressRun,
    assert_same_tree,
    kill_all,
    kill_with_dirty_journals,
    log_size,
    since,
    stop_all,
    verify_intact,
    wait_for,
)
from test_recovery_stress import (
    MIN_CLEAN,
    MIN_FSYNCS,
    MORE_FSYNCS,
    assert_replayed_once,
    report_recovery,
    wait_fsyncs,
    wait_recovered,
)

from clusterfs.format.block import BLOCK_SIZE
from clusterfs.format.diskbeat import AREA

pytestmark = pytest.mark.skipif(mountutil.missing_prerequisites() is not None,
                                reason=str(mountutil.missing_prerequisites()))

WRITER = ("import os,sys; fd=os.open(sys.argv[1], os.O_WRONLY|os.O_CREAT|os.O_TRUNC, 0o644);"
          "os.write(fd, bytes.fromhex(sys.argv[2])); os.fsync(fd); os.close(fd)")
CHUNK = 1 << 20
# the disk heartbeats (format/diskbeat.py): every running node rewrites its block there
# every interval, quorate or not; they are not filesystem data
BEATS = (range(AREA.start * BLOCK_SIZE, AREA.stop * BLOCK_SIZE),)


def start_writer(path: str, data: bytes) -> subprocess.Popen:
    """A process that creates, writes and fsyncs `path` (it may wait a long time)."""
    return subprocess.Popen([sys.executable, "-c", WRITER, path, data.hex()],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def device_digest(device: str, skip: tuple[range, ...] = ()) -> str:
    """sha256 of the device as it is on the disk (O_DIRECT: no page cache), leaving out
    the byte ranges in `skip` (blocks a node rewrites on its own, if any)."""
    h = hashlib.sha256()
    fd = os.open(device, os.O_RDONLY | os.O_DIRECT)
    buf = mmap.mmap(-1, CHUNK)
    try:
        offset = 0
        while n := os.preadv(fd, [buf], offset):
            chunk = bytearray(buf[:n])
            for r in skip:
                lo, hi = max(r.start, offset), min(r.stop, offset + n)
                if lo < hi:
                    chunk[lo - offset:hi - offset] = bytes(hi - lo)
            h.update(chunk)
            offset += n
    finally:
        buf.close()
        os.close(fd)
    return h.hexdigest()


def test_a_lone_node_without_quorum_writes_nothing_until_the_others_wake(tmp_path):
    with cluster(tmp_path, nodes=3) as c:
        blob = os.urandom(50_000)
        w = start_writer(c.path(1, "before"), b"quorate")
        assert w.wait(30) == 0
        stopped = [c.mounts[n].proc.pid for n in (2, 3)]
        for pid in stopped:
            os.kill(pid, signal.SIGSTOP)
        try:
            wait_node_status(c, 1, "quorum      NO", within=30)
            time.sleep(1)                        # let anything already under way land
            before = device_digest(c.device, BEATS)
            writer = start_writer(c.path(1, "during"), blob)
            time.sleep(8)                        # > 2 failure timeouts
            assert writer.poll() is None, writer.communicate()[0]   # waits, did not fail
            assert device_digest(c.device, BEATS) == before, "the lone node wrote to the disk"
        finally:
            for pid in stopped:
                os.kill(pid, signal.SIGCONT)
        assert writer.wait(60) == 0, writer.communicate()[0]
        for n in (2, 3):
            with open(c.path(n, "during"), "rb") as f:
                assert f.read() == blob
            with open(c.path(n, "before"), "rb") as f:
                assert f.read() == b"quorate"
        for n in (1, 2, 3):                      # nobody was expelled: all go on
            st = wait_node_status(c, n, "members     1 2 3\n", within=30)
            assert "quorum      yes" in st
            assert c.mounts[n].alive()


def test_a_recovery_begun_without_quorum_ends_once_the_quorum_returns(tmp_path):
    """Node 3 dies (kill -9, its journal holding transactions) and in the same instant
    node 2 freezes (SIGSTOP), while tools/stress runs on all three, nodes 1 and 2 also
    in one shared directory. Node 1, alone, has no quorum: it begins recovering the
    departed nodes and waits. Node 2 wakes: the two merge, fence node 3, replay its
    journal once and serve again (their stress runs go on without a failure), node 3's
    fsync'd files are all there, it rejoins, the nodes agree on the tree, fsck is clean.
    Before the DLM resynchronised the pairs a merge joins, what node 2 sent between its
    wake and the merge was dropped by node 1 (seen: a grant and a blocking callback),
    and the stress runs hung on those locks (issue 7)."""
    with cluster(tmp_path, nodes=3, size=1 << 30) as c:
        runs = {n: StressRun(n, c.mountpoint(n), 400 + 10 * n, tmp_path,
                             shared=None if n == 3 else "shared").start()
                for n in c.node_ids}
        frozen = c.mounts[2].pid
        try:
            wait_fsyncs(list(runs.values()), MIN_FSYNCS)
            offsets = {n: log_size(c, n) for n in (1, 2)}

            def freeze_node_2() -> None:
                kill_all([runs[3]])
                os.kill(frozen, signal.SIGSTOP)
            try:
                dirty = kill_with_dirty_journals(
                    c, [3], also=lambda: runs[3].clean_fsynced() >= MIN_CLEAN,
                    first=freeze_node_2)
                wait_for("node 1 to begin recovering without quorum",
                         lambda: "journal recovery for departed [2, 3]"
                         in since(c, 1, offsets[1]))
                assert "quorum      NO" in node_status(c, 1)
            finally:
                os.kill(frozen, signal.SIGCONT)
            report_recovery(wait_recovered(c, [1, 2], offsets, {3}))
            assert_replayed_once(c, dirty, offsets)
            for n in (1, 2):
                assert verify_intact(runs[3], c.mountpoint(n)) > 0
            wait_fsyncs([runs[1], runs[2]], MORE_FSYNCS)      # they serve again
            c.start(3)
            verify_intact(runs[3], c.mountpoint(3))
            stop_all(list(runs.values()))
            for n in (1, 2):
                runs[n].finish()
            assert_same_tree(c, c.node_ids)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(frozen, signal.SIGCONT)
            stop_all(list(runs.values()))
            kill_all(list(runs.values()))
