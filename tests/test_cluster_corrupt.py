"""A corrupt metadata block found by one node of a cluster (tier 3: three `clusterfs
mount --config` processes on one loop device; syscalls from separate processes).

The node that reads the block fails that call with EIO and withdraws. Its journal may
hold committed changes that never reached home, under locks the others wait for, so it
gives no lock back: it ends its mount, and the others fence it, replay its journal and
go on (README, "Failure behaviour"). Nothing fsync'd is lost, on any node; once the
block is mended the node mounts again and rejoins; fsck is clean at the end.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys

import mountutil
import pytest
from clusterutil import cluster, wait_node_status
from test_cluster_leave import node_log, write_and_fsync

pytestmark = pytest.mark.skipif(mountutil.missing_prerequisites() is not None,
                                reason=str(mountutil.missing_prerequisites()))


def read_back(path: str) -> bytes:
    """The file's bytes, read by another process."""
    code = "import sys; sys.stdout.write(open(sys.argv[1], 'rb').read().hex())"
    r = subprocess.run([sys.executable, "-c", code, path], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    return bytes.fromhex(r.stdout)


def write_then_stat(written: str, data: bytes, path: str) -> int:
    """Another process writes and fsyncs `written`, then stats `path` at once: 0 if it
    can, else the errno it got."""
    code = ("import os,sys\nfd=os.open(sys.argv[1], os.O_WRONLY|os.O_CREAT, 0o644)\n"
            "os.write(fd, bytes.fromhex(sys.argv[2])); os.fsync(fd); os.close(fd)\n"
            "try:\n os.stat(sys.argv[3])\nexcept OSError as e:\n print(e.errno)\n"
            "else:\n print(0)")
    r = subprocess.run([sys.executable, "-c", code, written, data.hex(), path],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return int(r.stdout)


def test_a_node_that_reads_a_corrupt_block_leaves_and_the_others_go_on(tmp_path):
    with cluster(tmp_path, nodes=3) as c:
        os.mkdir(c.path(1, "d"))
        write_and_fsync(c.path(1, "d", "victim"), b"victim's bytes", 60)
        kept = {n: os.urandom(3000) + bytes([n]) for n in (1, 2, 3)}
        for n, data in kept.items():              # each node's own fsync'd file
            write_and_fsync(c.path(n, f"kept{n}"), data, 60)
        # node 2 reads the victim: node 1 writes its inode home and keeps it in PR
        assert read_back(c.path(2, "d", "victim")) == b"victim's bytes"
        ino = os.stat(c.path(2, "d", "victim")).st_ino
        good = mountutil.swap_block(c.device, ino)

        # node 3 never read it: its stat reads the corrupt block from the disk (just
        # after an fsync there, so its journal likely holds a commit not yet home)
        last = os.urandom(5000)
        assert write_then_stat(c.path(3, "last3"), last, c.path(3, "d", "victim")) == \
            errno.EIO
        m3 = c.mounts.pop(3)
        try:
            m3.proc.wait(30)                      # it ends its own mount
        finally:
            m3.clean_after_crash()
        log3 = m3.log_text()
        assert "withdrawn while in the cluster" in log3, log3[-3000:]
        assert str(ino) in log3 or hex(ino) in log3, "the block is not named:\n" + log3[-3000:]

        # the others fence node 3, replay its journal and go on
        wait_node_status(c, 1, "departed [3]", within=40)
        write_and_fsync(c.path(1, "after"), b"written after node 3 left", 60)
        assert read_back(c.path(2, "after")) == b"written after node 3 left"
        for n, data in kept.items():              # node 3's fsync'd files too
            assert read_back(c.path(1, f"kept{n}")) == data
            assert read_back(c.path(2, f"kept{n}")) == data
        assert read_back(c.path(2, "last3")) == last
        recovered = node_log(c, 1) + node_log(c, 2)
        assert "journal recovery done" in recovered and "slot" in recovered
        assert read_back(c.path(2, "d", "victim")) == b"victim's bytes"   # cached, in PR

        # mended, node 3 mounts again and sees one tree
        assert mountutil.swap_block(c.device, ino, good) != good
        c.start(3)
        assert read_back(c.path(3, "d", "victim")) == b"victim's bytes"
        assert read_back(c.path(3, "after")) == b"written after node 3 left"
        assert read_back(c.path(3, "last3")) == last
        assert sorted(os.listdir(c.path(3))) == sorted(os.listdir(c.path(1)))
    # (cluster() unmounts every node and requires fsck clean)
