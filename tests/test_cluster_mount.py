"""Several nodes mount one device (tier 3): three `clusterfs mount --config` processes
on one loop device over 127.0.0.1, driven with real syscalls from this process.

Strict coherence: once a syscall on one node returns, the next syscall on any other
node sees its effect. Every check here makes the change on one mount and looks on
another; a stale cache anywhere (our inode cache, the journal overlay, the kernel's
attribute, name or page caches) fails it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import random
import re
import stat
import struct
import subprocess
import sys
import time

import mountutil
import pytest
from clusterutil import CLUSTER_NAME, cluster
from mountutil import run_cli

pytestmark = pytest.mark.skipif(mountutil.missing_prerequisites() is not None,
                                reason=str(mountutil.missing_prerequisites()))


def test_each_operation_is_seen_by_the_next_syscall_on_another_node(tmp_path):
    with cluster(tmp_path, nodes=3) as c:
        a, b, x = (lambda *p: c.path(1, *p)), (lambda *p: c.path(2, *p)), \
            (lambda *p: c.path(3, *p))
        # create, and data written without fsync
        with open(a("f"), "wb") as f:
            f.write(b"one")
        with open(b("f"), "rb") as f:
            assert f.read() == b"one"
        # overwrite and append from another node while a reader elsewhere keeps it open
        with open(x("f"), "rb") as reader:
            assert reader.read() == b"one"
            with open(b("f"), "r+b") as f:
                f.write(b"ONE")
                f.seek(0, os.SEEK_END)
                f.write(b"-two")
            reader.seek(0)
            assert reader.read() == b"ONE-two"
        assert os.stat(a("f")).st_size == 7
        # mkdir, and readdir contents
        os.mkdir(b("d"))
        assert sorted(os.listdir(x("."))) == ["d", "f"]
        # rename across directories over an existing target
        with open(x("d", "target"), "wb") as f:
            f.write(b"old target")
        os.rename(a("f"), a("d", "target"))
        assert not os.path.exists(b("f"))
        with open(b("d", "target"), "rb") as f:
            assert f.read() == b"ONE-two"
        assert os.listdir(x("d")) == ["target"]
        # link, symlink
        os.link(b("d", "target"), b("hard"))
        assert os.stat(x("d", "target")).st_nlink == 2
        os.symlink("d/target", x("soft"))
        assert os.readlink(a("soft")) == "d/target"
        with open(a("soft"), "rb") as f:
            assert f.read() == b"ONE-two"
        # chmod, chown, utimens
        os.chmod(a("hard"), 0o600)
        assert stat.S_IMODE(os.stat(b("d", "target")).st_mode) == 0o600
        os.chown(b("hard"), 1234, 5678)
        st = os.stat(x("hard"))
        assert (st.st_uid, st.st_gid) == (1234, 5678)
        os.utime(x("hard"), ns=(1_000_000_123, 2_000_000_456))
        assert os.stat(a("hard")).st_mtime_ns == 2_000_000_456
        # truncate
        os.truncate(b("hard"), 3)
        with open(a("d", "target"), "rb") as f:
            assert f.read() == b"ONE"
        # xattrs
        os.setxattr(x("hard"), "user.colour", b"blue")
        assert os.getxattr(a("hard"), "user.colour") == b"blue"
        os.removexattr(b("hard"), "user.colour")
        with pytest.raises(OSError) as e:
            os.getxattr(x("hard"), "user.colour")
        assert e.value.errno == errno.ENODATA
        # unlink, rmdir
        os.unlink(a("hard"))
        assert not os.path.exists(b("hard"))
        assert os.stat(x("d", "target")).st_nlink == 1
        os.unlink(b("d", "target"))
        os.rmdir(x("d"))
        assert sorted(os.listdir(a("."))) == ["soft"]
        # statfs: space taken on one node is missing on another
        before = os.statvfs(b(".")).f_bfree
        with open(a("big"), "wb") as f:
            f.write(os.urandom(8 << 20))
            f.flush()
            os.fsync(f.fileno())
        assert os.statvfs(x(".")).f_bfree <= before - (8 << 20) // 4096
        os.unlink(b("big"))


def test_a_listing_of_another_nodes_directory_has_every_inode_number_and_type(tmp_path):
    """Node 2 lists a directory node 1 filled (files, a directory, a symlink, a fifo):
    its readdirplus entries carry names alone (no attributes: fuse/operations.py,
    _reply_names), so the inode numbers and types scandir shows come from the
    dirents; they must be node 1's, and a stat of each afterwards must agree too."""
    with cluster(tmp_path, nodes=3) as c:
        os.mkdir(c.path(1, "d"))
        for i in range(300):
            with open(c.path(1, "d", f"f{i}"), "wb") as f:
                f.write(b"x" * i)
        os.mkdir(c.path(1, "d", "sub"))
        os.symlink("f1", c.path(1, "d", "link"))
        os.mkfifo(c.path(1, "d", "fifo"))
        names = [f"f{i}" for i in range(300)] + ["sub", "link", "fifo"]
        want = {name: (st.st_ino, stat.S_IFMT(st.st_mode))
                for name in names for st in [os.lstat(c.path(1, "d", name))]}
        assert sorted(os.listdir(c.path(1, "d"))) == sorted(names)
        kinds = {stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "link",
                 stat.S_IFIFO: "other"}

        def kind(e: os.DirEntry) -> str:
            if e.is_symlink():
                return "link"
            if e.is_dir(follow_symlinks=False):
                return "dir"
            return "file" if e.is_file(follow_symlinks=False) else "other"

        with os.scandir(c.path(2, "d")) as it:
            seen = {e.name: (e.inode(), kind(e)) for e in it}
        assert seen == {n: (ino, kinds[t]) for n, (ino, t) in want.items()}
        for name, (ino, t) in want.items():
            st = os.lstat(c.path(2, "d", name))
            assert (st.st_ino, stat.S_IFMT(st.st_mode)) == (ino, t), name
        assert os.stat(c.path(2, "d", "f299")).st_size == 299


def test_random_operations_agree_on_every_node(tmp_path):
    """Random operations with random sizes and offsets, each on a random node, each
    checked at once on another node against a model: contents, sizes, listings."""
    rng = random.Random(20261204)
    model: dict[str, bytes] = {}          # file path (relative) -> content
    dirs = ["", "d1", "d2"]
    with cluster(tmp_path, nodes=3) as c:
        os.mkdir(c.path(1, "d1"))
        os.mkdir(c.path(2, "d2"))
        for step in range(1500):
            node, other = rng.sample(c.node_ids, 2)
            names = sorted(model)
            op = rng.choice(["write", "pwrite", "truncate", "rename", "unlink"]) \
                if names else "write"
            if op == "write":
                name = os.path.join(rng.choice(dirs), f"f{rng.randrange(40)}")
                data = rng.randbytes(rng.choice([0, 1, 100, 4095, 4096, 5000, 70000]))
                with open(c.path(node, name), "wb") as f:
                    f.write(data)
                model[name] = data
            elif op == "pwrite":
                name = rng.choice(names)
                off = rng.randrange(len(model[name]) + 9000)
                data = rng.randbytes(rng.randrange(1, 20000))
                fd = os.open(c.path(node, name), os.O_WRONLY)
                try:
                    os.pwrite(fd, data, off)
                finally:
                    os.close(fd)
                new = bytearray(model[name].ljust(off + len(data), b"\0"))
                new[off : off + len(data)] = data
                model[name] = bytes(new)
            elif op == "truncate":
                name = rng.choice(names)
                size = rng.randrange(len(model[name]) + 10000)
                os.truncate(c.path(node, name), size)
                model[name] = model[name][:size].ljust(size, b"\0")
            elif op == "rename":
                old = rng.choice(names)
                name = os.path.join(rng.choice(dirs), f"f{rng.randrange(40)}")
                os.rename(c.path(node, old), c.path(node, name))
                model[name] = model.pop(old)
            else:
                name = rng.choice(names)
                os.unlink(c.path(node, name))
                del model[name]
            if name in model:
                with open(c.path(other, name), "rb") as f:
                    assert f.read() == model[name], f"step {step} {op} {name} on {other}"
                assert os.stat(c.path(other, name)).st_size == len(model[name])
            else:
                assert not os.path.exists(c.path(other, name)), f"step {step} {op} {name}"
            if step % 50 == 0:
                for d in dirs:
                    want = sorted([os.path.basename(n) for n in model
                                   if os.path.dirname(n) == d] + (["d1", "d2"] if d == ""
                                                                   else []))
                    assert sorted(os.listdir(c.path(other, d))) == want, f"step {step} {d!r}"
        for name, data in model.items():
            for n in c.node_ids:
                with open(c.path(n, name), "rb") as f:
                    assert f.read() == data, f"{name} on node {n} at the end"


def test_two_writers_and_a_reader_at_once(tmp_path):
    """Writers on two nodes at the same time (separate processes), a reader verifying on
    the third: every fsync'd file is whole everywhere."""
    with cluster(tmp_path, nodes=3) as c:
        os.mkdir(c.path(1, "w1"))
        os.mkdir(c.path(1, "w2"))
        writer = ("import os,sys,hashlib\n"
                  "root=sys.argv[1]\n"
                  "for i in range(60):\n"
                  "    data=hashlib.sha256(f'{root}{i}'.encode()).digest()*(1000+i*37)\n"
                  "    p=os.path.join(root,f'file{i}')\n"
                  "    with open(p,'wb') as f:\n"
                  "        f.write(data); f.flush(); os.fsync(f.fileno())\n")
        procs = [subprocess.Popen([sys.executable, "-c", writer, c.path(n, f"w{n}")])
                 for n in (1, 2)]
        seen = 0
        while any(p.poll() is None for p in procs):
            for n in (1, 2):
                for name in os.listdir(c.path(3, f"w{n}")):
                    seen += 1
                    assert os.stat(c.path(3, f"w{n}", name)).st_size >= 0
        assert [p.wait(120) for p in procs] == [0, 0]
        for n in (1, 2):
            root = c.path(n, f"w{n}")
            for i in range(60):
                want = hashlib.sha256(f"{root}{i}".encode()).digest() * (1000 + i * 37)
                with open(c.path(3, f"w{n}", f"file{i}"), "rb") as f:
                    assert f.read() == want
        assert seen > 0


def test_a_cluster_mount_has_programs_read_a_megabyte_at_a_time(tmp_path):
    """A cluster's files are direct_io (no page cache, no kernel read-ahead), so every
    read(2) is a request to the node; stdio, Python's buffered files, cp and cmp size
    their buffers by st_blksize (cmp of a 256 MiB file by hand: 30 MiB/s at 4 KiB,
    810-1243 MiB/s at 1 MiB). A buffered reader taking 4 KiB at a time gets its bytes
    right either way."""
    with cluster(tmp_path, nodes=2) as c:
        data = os.urandom(3 << 20)
        with open(c.path(1, "f"), "wb") as f:
            f.write(data)
        st = os.stat(c.path(2, "f"))
        assert st.st_blksize == 1 << 20 and st.st_size == len(data)
        got = bytearray()
        with open(c.path(2, "f"), "rb") as f:
            while chunk := f.read(4096):
                got += chunk
        assert got == data


def test_a_sequential_readers_read_ahead_never_serves_bytes_written_since(tmp_path):
    """Node 2 reads a file sequentially (its device read-ahead runs 32 MiB ahead of
    it); node 1 then overwrites pieces in place further on, without fsync: node 2's
    next read of each piece sees it. The read-ahead once ran past the data locks node
    2 held: it read chunk 2 (bytes 8-12 MiB) before node 1 wrote there, and node 1's
    demote to PR left that copy standing (docs/locking.md, "Byte-range data locks")."""
    with cluster(tmp_path, nodes=2) as c:
        size = 40 << 20
        with open(c.path(1, "f"), "wb") as f:
            f.write(b"A" * size)
            os.fsync(f.fileno())
        reader = os.open(c.path(2, "f"), os.O_RDONLY)
        writer = os.open(c.path(1, "f"), os.O_WRONLY)
        try:
            assert os.pread(reader, 1 << 20, 0) == b"A" * (1 << 20)
            time.sleep(0.5)                       # the read-ahead has read its window
            pieces = [(10 << 20) + 4096, (21 << 20) + 123, (33 << 20) - 100, (2 << 20)]
            for n, off in enumerate(pieces):
                new = bytes([ord("a") + n]) * 4096
                assert os.pwrite(writer, new, off) == len(new)
                assert os.pread(reader, len(new), off) == new, f"stale at {off}"
            # a sequential pass over all of it after: every piece, nothing else changed
            got = bytearray()
            for off in range(0, size, 1 << 20):
                got += os.pread(reader, 1 << 20, off)
            want = bytearray(b"A" * size)
            for n, off in enumerate(pieces):
                want[off : off + 4096] = bytes([ord("a") + n]) * 4096
            assert got == want
        finally:
            os.close(reader)
            os.close(writer)


def test_random_overwrites_and_sequential_reads_of_one_big_file_agree(tmp_path):
    """One 40 MiB file; each step a random node overwrites a random piece in place
    while readers on the other nodes go through it in 1 MiB reads (their read-ahead
    and data locks running ahead of them), each read checked against a model."""
    rng = random.Random(20261206)
    size = 40 << 20
    with cluster(tmp_path, nodes=3) as c:
        model = bytearray(rng.randbytes(size))
        with open(c.path(1, "big"), "wb") as f:
            f.write(model)
        fds = {n: os.open(c.path(n, "big"), os.O_RDWR) for n in c.node_ids}
        at = {n: rng.randrange(0, size, 1 << 20) for n in c.node_ids}   # each reader's place
        try:
            for step in range(400):
                writer = rng.choice(c.node_ids)
                off = rng.randrange(size - 20000)
                data = rng.randbytes(rng.randrange(1, 20000))
                assert os.pwrite(fds[writer], data, off) == len(data)
                model[off : off + len(data)] = data
                for n in c.node_ids:
                    if n == writer:
                        continue
                    if rng.random() < 0.1:
                        at[n] = rng.randrange(0, size, 4096)     # the reader jumps
                    got = os.pread(fds[n], 1 << 20, at[n])
                    assert got == model[at[n] : at[n] + (1 << 20)], \
                        f"step {step}: node {n} at {at[n]} (node {writer} wrote {off})"
                    at[n] = (at[n] + len(got)) % size
        finally:
            for fd in fds.values():
                os.close(fd)


def test_a_released_block_is_never_replayed_over_a_newer_copy(tmp_path):
    """Node 1 changes an inode and gives up its lock; node 2 changes it again; node 1
    dies with its journal open; the first node to mount replays node 1's journal: node
    2's version must stand (docs/journal.md, the no-stale-replay rule)."""
    with cluster(tmp_path, nodes=3) as c:
        with open(c.path(1, "f"), "wb") as f:
            f.write(b"x")
        os.chmod(c.path(1, "f"), 0o600)
        fd = os.open(c.path(1, "f"), os.O_RDONLY)
        os.fsync(fd)                  # the 0o600 inode is committed in node 1's journal
        os.close(fd)
        os.chmod(c.path(2, "f"), 0o644)   # node 1's lock goes to node 2
        fd = os.open(c.path(2, "f"), os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
        c.kill9(1)                    # node 1's journal stays open (dirty)
        c.unmount(2)
        c.unmount(3)
        c.start(2, 3)                 # no live node: the first of them replays every journal
        assert stat.S_IMODE(os.stat(c.path(3, "f")).st_mode) == 0o644
        logs = c.logs()
        assert "replaying every dirty journal" in logs


def test_whole_cluster_killed_then_mounted_again_keeps_every_fsynced_byte(tmp_path):
    with cluster(tmp_path, nodes=3) as c:
        blobs = {}
        for n in c.node_ids:
            data = os.urandom(300_000 + n)
            with open(c.path(n, f"from{n}"), "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            blobs[n] = data
        for n in list(c.mounts):
            c.kill9(n)
        c.start(1, 2, 3)
        for n, data in blobs.items():
            with open(c.path(3 - n % 3, f"from{n}"), "rb") as f:
                assert f.read() == data


def test_device_and_mount_must_agree_on_the_cluster(tmp_path):
    with mountutil.loop_device(128 << 20, tmp_path) as dev:
        r = run_cli("mkfs", "-q", "-j", "2", "--cluster", "bad name!", dev)
        assert r.returncode == 1 and "cluster name" in r.stderr
        with open(dev, "rb") as f:
            assert f.read(1 << 20) == bytes(1 << 20)     # refused: nothing written
        r = run_cli("mkfs", "-q", "-j", "2", "--cluster", CLUSTER_NAME, dev)
        assert r.returncode == 0, r.stderr
        mp = tmp_path / "mnt"
        mp.mkdir()
        r = run_cli("mount", "-f", dev, str(mp))          # one-node mount of a cluster disk
        assert r.returncode == 1
        assert f"belongs to cluster '{CLUSTER_NAME}'" in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
        from clusterutil import write_config
        other = tmp_path / "other"
        other.mkdir()
        cfg = write_config(other, 2, name="someoneelse")
        # a state dir of the test's own: the default one is the host's
        r = run_cli("mount", "-f", "--config", str(cfg), "--node-id", "1",
                    "--state-dir", str(other), dev, str(mp))
        assert r.returncode == 1 and "not 'someoneelse'" in r.stderr
        r = run_cli("mount", "-f", "--config", str(cfg), dev, str(mp))
        assert r.returncode == 1 and "--config and --node-id go together" in r.stderr
        # the override mounts it alone, for recovery by hand
        with mountutil.mounted(dev, str(mp), extra_args=["--no-cluster-check"]) as m:
            with open(m.path("f"), "wb") as f:
                f.write(b"by hand")
        assert mountutil.fsck(dev).returncode == 0


def test_a_cluster_mount_of_a_one_node_device_is_refused(tmp_path):
    with mountutil.loop_device(128 << 20, tmp_path) as dev:
        mountutil.mkfs(dev, journals=2)
        from clusterutil import write_config
        cfg = write_config(tmp_path, 2)
        mp = tmp_path / "mnt"
        mp.mkdir()
        r = run_cli("mount", "-f", "--config", str(cfg), "--node-id", "1",
                    "--state-dir", str(tmp_path), dev, str(mp))
        assert r.returncode == 1 and "a one-node filesystem" in r.stderr


def test_a_node_beyond_the_journal_count_is_refused_and_the_others_go_on(tmp_path):
    """A device formatted with two journals takes two nodes: a third is refused with
    one line that says why and what to do, and the two mounted go on."""
    with cluster(tmp_path, nodes=3, journals=2, start=False) as c:
        c.start(1, 2)
        with pytest.raises(AssertionError) as refused:
            c.start(3)
        c.mounts.pop(3).force_unmount()           # (nothing mounted: only forgets it)
        assert "exited (1)" in str(refused.value)
        assert "all 2 journal slots are in use" in str(refused.value)
        assert "mkfs.clusterfs -j N" in str(refused.value)
        # it joined, wrote nothing and left: nobody fenced it (its exit status stands)
        survivors = c.mounts[1].log_text() + c.mounts[2].log_text()
        assert "fencing node 3" not in survivors
        with open(c.path(1, "after"), "wb") as f:
            f.write(b"still serving")
        with open(c.path(2, "after"), "rb") as f:
            assert f.read() == b"still serving"


def test_status_shows_the_mount_and_its_glocks(tmp_path):
    with cluster(tmp_path, nodes=3) as c:
        with open(c.path(1, "f"), "wb") as f:
            f.write(b"x" * 8192)
            f.flush()
            os.fsync(f.fileno())
        with open(c.path(1, "f"), "r+b") as f:    # an overwrite in place + fdatasync:
            f.write(b"y" * 4096)                  # its flush through io_uring
            f.flush()
            os.fdatasync(f.fileno())
        with open(c.path(2, "f"), "rb") as f:     # a read node 2 has nothing of:
            assert f.read() == b"y" * 4096 + b"x" * 4096   # through io_uring there
        r = run_cli("status", "--control", c.control(1))
        assert r.returncode == 0, r.stderr
        assert f"mount       {c.mountpoint(1)}" in r.stdout
        assert "journal slot" in r.stdout
        assert "inode:" in r.stdout          # a cached glock, with its mode
        assert re.search(r"journal     commits=\d+ blocks=\d+ checkpoints=\d+ "
                         r"write-backs=\d+ \(blocks revoked=\d+\)", r.stdout), r.stdout
        assert re.search(r"device      reads=\d+ writes=\d+ io_uring flushes=[1-9]",
                         r.stdout), r.stdout
        assert re.search(r"collector   full collections=\d+ freed=\d+ longest pause=",
                         r.stdout), r.stdout
        assert re.search(r"loop stalls \d+ of 0.3 s or more, longest [0-9.]+ s", r.stdout), \
            r.stdout
        two = run_cli("status", "--control", c.control(2)).stdout
        assert re.search(r"io_uring flushes=\d+ reads=[1-9]", two), two
        # a cluster node runs ahead of ordinary processes (its loop answers probes),
        # and so does every thread it started
        pid = c.mounts[1].proc.pid
        assert os.getpriority(os.PRIO_PROCESS, pid) == -10
        for tid in os.listdir(f"/proc/{pid}/task"):
            assert os.getpriority(os.PRIO_PROCESS, int(tid)) == -10, tid
        slots = json.loads(run_cli("status", "--control", c.control(1), "--json").stdout)
        holders = {s["holder"]: s["slot"] for s in slots["slots"]}
        assert sorted(n for n in holders if isinstance(n, int)) == [1, 2, 3], slots["slots"]
        assert holders[1] == slots["mount"]["slot"]          # node 1's own, as it says
        assert f"{holders[2]}: node 2" in r.stdout
        # --tasks: every task of the node and the frames it waits in (for a hang)
        r = run_cli("status", "--tasks", "--control", c.control(1))
        assert r.returncode == 0, r.stderr
        assert re.search(r"^task .*\n    .*cache/transaction\.py:\d+ run_timer", r.stdout,
                         re.MULTILINE), r.stdout[-3000:]


def _glock_stats(c, node: int) -> dict:
    r = run_cli("status", "--control", c.control(node), "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["mount"]["glock_stats"]


def test_a_bounded_lock_cache_keeps_every_file_and_stays_coherent(tmp_path):
    """-o max_glocks=200: node 1 makes 1200 files with data; its lock cache goes back
    under the bound (the least recently used locks let go, as if another node had asked),
    every file reads back on both nodes, and node 2's change to one of the first files
    (long let go by node 1) is what node 1 reads."""
    with cluster(tmp_path, nodes=2, options="max_glocks=200") as c:
        os.mkdir(c.path(1, "many"))
        for i in range(1200):
            with open(c.path(1, "many", f"f{i:04d}"), "wb") as f:
                f.write(b"%d" % i * 50)
        deadline = time.monotonic() + 30
        while (stats := _glock_stats(c, 1))["cached"] > 200:
            assert time.monotonic() < deadline, f"cache not shrunk: {stats}"
            time.sleep(0.2)
        assert stats["evicted"] >= 1000, stats
        with open(c.path(2, "many", "f0000"), "r+b") as f:
            f.write(b"CHANGED")
        for node in (1, 2):
            for i in range(1200):
                with open(c.path(node, "many", f"f{i:04d}"), "rb") as f:
                    want = b"%d" % i * 50
                    if i == 0:
                        want = b"CHANGED" + want[7:]
                    assert f.read() == want, (node, i)
        assert len(os.listdir(c.path(1, "many"))) == 1200


def test_survivors_replay_a_killed_nodes_journal_and_go_on(tmp_path):
    """kill -9 of a node right after its fsyncs: what it committed may be only in its
    journal; the survivors replay that journal before anyone uses a lock it held, then
    carry on; the node comes back and everything it fsync'd is there, on every node."""
    with cluster(tmp_path, nodes=3) as c:
        os.mkdir(c.path(2, "shared"))
        data = {f"n1-{i}": os.urandom(5000 + 97 * i) for i in range(20)}
        for name, blob in data.items():
            with open(c.path(1, "shared", name), "wb") as f:
                f.write(blob)
                f.flush()
                os.fsync(f.fileno())
        c.kill9(1)
        for name, blob in data.items():          # on a survivor: replayed, not lost
            with open(c.path(2, "shared", name), "rb") as f:
                assert f.read() == blob, name
        with open(c.path(3, "shared", "after"), "wb") as f:   # and the survivors go on
            f.write(b"survivor")
        r = run_cli("status", "--control", c.control(2))
        assert r.returncode == 0, r.stderr
        assert "recovery    gen" in r.stdout and "departed [1]" in r.stdout
        assert "journal recovery done" in c.logs()
        c.start(1)                                # the killed node rejoins
        assert sorted(os.listdir(c.path(1, "shared"))) == sorted([*data, "after"])
        with open(c.path(1, "shared", "after"), "rb") as f:
            assert f.read() == b"survivor"


FDATASYNC_WRITER = """
import os, random, struct, sys
path, log = sys.argv[1], sys.argv[2]
blocks = int(sys.argv[3])
fd = os.open(path, os.O_RDWR)
out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
rng = random.Random(7)
seq = 0
while True:
    seq += 1
    blk = rng.randrange(blocks)
    os.pwrite(fd, struct.pack("<QQ", seq, blk) * 256, blk * 4096)
    os.fdatasync(fd)
    os.write(out, b"%d %d\\n" % (seq, blk))
    os.fsync(out)
"""


def test_fdatasynced_overwrites_survive_their_nodes_kill9(tmp_path):
    """Random 4 KiB overwrites, each fdatasync'd (the flush, and the overwrite still
    queued, go through io_uring where the kernel allows it), while node 1 is killed:
    on a survivor every block holds its last acknowledged write or a later one."""
    blocks = 256
    with cluster(tmp_path, nodes=3) as c:
        with open(c.path(1, "db"), "wb") as f:
            f.write(bytes(blocks * 4096))
            f.flush()
            os.fsync(f.fileno())
        log = tmp_path / "acked.log"
        writer = subprocess.Popen([sys.executable, "-c", FDATASYNC_WRITER, c.path(1, "db"),
                                   str(log), str(blocks)], stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 60
            while (not log.exists() or log.stat().st_size < 4000) and writer.poll() is None:
                assert time.monotonic() < deadline, "the writer made no progress"
                time.sleep(0.05)
            assert writer.poll() is None, "the writer failed before the kill"
            c.kill9(1)
        finally:
            writer.kill()
            writer.wait()
        acked: dict[int, int] = {}
        for line in log.read_text().splitlines():
            seq, blk = map(int, line.split())
            acked[blk] = max(acked.get(blk, 0), seq)
        assert len(acked) > 50
        with open(c.path(2, "db"), "rb") as f:
            data = f.read()
        for blk, seq in acked.items():
            got_seq, got_blk = struct.unpack_from("<QQ", data, blk * 4096)
            assert got_blk == blk and got_seq >= seq, (blk, seq, got_seq, got_blk)
            assert data[blk * 4096 : (blk + 1) * 4096] == struct.pack("<QQ", got_seq, blk) * 256


def test_a_killed_nodes_open_unlinked_files_are_freed_by_the_survivors(tmp_path):
    """Node 1 has two files open when it is killed: one it unlinked itself, one node 2
    unlinked (node 2 could not free it: open on node 1). Nobody will ever close them;
    the survivors free both after replaying node 1's journal (from node 1's orphan
    list, and node 2's own), so the space comes back and fsck finds no leak."""
    with cluster(tmp_path, nodes=3) as c:
        before = os.statvfs(c.path(2, ".")).f_bfree
        fds = []
        for name in ("mine", "theirs"):
            fd = os.open(c.path(1, name), os.O_RDWR | os.O_CREAT, 0o600)
            os.write(fd, os.urandom(4 << 20))
            fds.append(fd)
        os.unlink(c.path(1, "mine"))
        os.unlink(c.path(2, "theirs"))
        os.fsync(fds[0])                     # node 1's unlink and orphan entry committed
        c.kill9(1)
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        deadline = time.monotonic() + 60
        while os.statvfs(c.path(2, ".")).f_bfree < before - 16 and \
                time.monotonic() < deadline:
            time.sleep(0.5)
        assert os.statvfs(c.path(3, ".")).f_bfree >= before - 16, c.logs()[-3000:]
        assert "orphan sweep: freed" in c.logs()
        c.start(1)


# A process holding `count` files of its own open, each unlinked (and so an orphan of
# the node it runs on), until its stdin closes.
HOLD_UNLINKED = """
import os, sys
where, count, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
fds = []
for i in range(count):
    path = os.path.join(where, f"held{i}")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    if size:
        os.write(fd, os.urandom(size))
    os.unlink(path)
    fds.append(fd)
os.fsync(fds[-1])
print("held", flush=True)
sys.stdin.read()
"""


def test_orphans_a_full_survivor_cannot_adopt_stay_listed_until_it_has_room(tmp_path):
    """Node 1 dies with 20 open files it unlinked (listed in its slot's orphan block);
    nodes 2 and 3 hold as many unlinked files open as their own orphan blocks can list.
    The survivor that adopts node 1's list has no room for it: the entries must stay
    listed in node 1's slot (taking them out of it and listing them nowhere leaked them,
    2306 inodes after stress-ng's `open` on a node that died: fsck "marked used but
    unreachable"), and be adopted and freed once the survivors' own orphans are closed."""
    from clusterfs.format.orphan import ORPHANS_PER_BLOCK
    with cluster(tmp_path, nodes=3, mkfs_args=("--orphans", str(ORPHANS_PER_BLOCK))) as c:
        for n in (1, 2, 3):
            os.mkdir(c.path(n, f"d{n}"))
        before = os.statvfs(c.path(2, ".")).f_bfree

        def hold(n: int, count: int, size: int) -> subprocess.Popen:
            p = subprocess.Popen([sys.executable, "-c", HOLD_UNLINKED, c.path(n, f"d{n}"),
                                  str(count), str(size)], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True)
            assert p.stdout.readline() == "held\n"
            return p
        holders = {n: hold(n, ORPHANS_PER_BLOCK, 0) for n in (2, 3)}   # their lists full
        victim = hold(1, 20, 64 << 10)                           # 20 x 16 blocks
        c.kill9(1)
        victim.kill()
        victim.wait()
        deadline = time.monotonic() + 60
        while "orphan inodes of journal slot" not in c.logs() and \
                time.monotonic() < deadline:
            time.sleep(0.2)
        assert "orphan inodes of journal slot" in c.logs(), c.logs()[-3000:]
        for p in holders.values():                               # their own orphans go
            p.stdin.close()
            p.wait(60)
        deadline = time.monotonic() + 60
        while os.statvfs(c.path(2, ".")).f_bfree < before - 16 and \
                time.monotonic() < deadline:
            time.sleep(0.5)
        assert os.statvfs(c.path(3, ".")).f_bfree >= before - 16, c.logs()[-3000:]
        c.start(1)


def test_a_killed_node_with_more_orphans_than_one_block_lists_leaves_no_leak(tmp_path):
    """Node 1 dies holding 600 files it unlinked while open, more than one orphan block
    lists (507; stress-ng's `open` stressor holds about 2300 per node). Its slot has
    several blocks: every one of them is listed, adopted by a survivor after the replay
    and freed, and fsck (at the end of `cluster`) finds no leak."""
    from clusterfs.format.orphan import ORPHANS_PER_BLOCK
    held = ORPHANS_PER_BLOCK + 93
    with cluster(tmp_path, nodes=3) as c:
        os.mkdir(c.path(1, "d1"))
        before = os.statvfs(c.path(2, ".")).f_bfree
        holder = subprocess.Popen([sys.executable, "-c", HOLD_UNLINKED, c.path(1, "d1"),
                                   str(held), "4096"], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True)
        try:
            assert holder.stdout.readline() == "held\n"
            c.kill9(1)
        finally:
            holder.kill()
            holder.wait()
        adopted = f"adopted {held} orphan inodes of journal slot"
        deadline = time.monotonic() + 60
        while not any(adopted in c.mounts[n].log_text() for n in (2, 3)) and \
                time.monotonic() < deadline:
            time.sleep(0.2)
        assert any(adopted in c.mounts[n].log_text() for n in (2, 3)), c.logs()[-3000:]
        # (2 blocks a file; the directory keeps the leaves its 600 names took)
        while os.statvfs(c.path(2, ".")).f_bfree < before - 64 and \
                time.monotonic() < deadline + 60:
            time.sleep(0.5)
        assert os.statvfs(c.path(3, ".")).f_bfree >= before - 64, c.logs()[-3000:]
        c.start(1)


STRESS = [sys.executable, os.path.join(os.path.dirname(__file__), "..", "tools", "stress")]


def test_three_nodes_racing_on_the_same_names_in_one_directory(tmp_path):
    """tools/stress with two processes on each of three nodes, all in one shared
    directory (creates, renames over targets and across directories, links, unlinks,
    rmdirs, xattrs, writes on the same names): no error but the races' expected ones,
    every node sees the same tree, fsck clean. This crashed a node (a link count driven
    to -1 by a rename that missed a concurrent unlink) and gave ESTALE (the kernel's
    stale directory aliases) before."""
    with cluster(tmp_path, nodes=3) as c:
        runs = [subprocess.Popen(
            [*STRESS, "run", "--dir", c.path(n, "."), "--seed", str(700 + 10 * n),
             "--ops", "1200", "--procs", "2", "--shared", "shared", "--private", "",
             "--progress", "1000"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True) for n in (1, 2, 3)]
        outs = [r.communicate(timeout=600)[0] for r in runs]
        for n, (r, out) in enumerate(zip(runs, outs, strict=True), 1):
            assert r.returncode == 0 and "stress: 0 failure(s)" in out, \
                f"node {n}:\n{out[-4000:]}"
        digests = {subprocess.run([*STRESS, "digest", "--dir", c.path(n, "shared")],
                                  capture_output=True, text=True, check=True).stdout.split()[0]
                   for n in (1, 2, 3)}
        assert len(digests) == 1, digests


def test_clusterfs_umount_of_the_last_node_without_quorum(tmp_path):
    """Two of three nodes die: the last one has no quorum, so every call on it waits;
    `clusterfs umount` must not ask it anything, and must return once it has exited.
    (Two clean unmounts would leave it quorate: tests/test_cluster_leave.py.)"""
    with cluster(tmp_path, nodes=3) as c:
        with open(c.path(3, "f"), "wb") as f:
            f.write(b"last")
            f.flush()
            os.fsync(f.fileno())
        c.kill9(1)
        c.kill9(2)
        last = c.mounts.pop(3)
        r = run_cli("umount", c.mountpoint(3), timeout=90)
        assert r.returncode == 0, r.stderr
        assert last.proc.wait(5) == 0
        last.force_unmount()          # nothing left; forget it
        c.start(1, 2)
        with open(c.path(1, "f"), "rb") as f:
            assert f.read() == b"last"


def test_a_file_unlinked_on_one_node_stays_usable_where_it_is_open(tmp_path):
    """iopen: node 1 has a file open, node 2 unlinks it; node 1 goes on reading and
    writing it; only node 1's close frees its blocks (fsck clean, space back)."""
    with cluster(tmp_path, nodes=3) as c:
        before = os.statvfs(c.path(3, ".")).f_bfree
        blob = os.urandom(4 << 20)
        fd = os.open(c.path(1, "f"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            os.write(fd, blob)
            os.fsync(fd)
            os.unlink(c.path(2, "f"))
            assert not os.path.exists(c.path(3, "f"))
            assert os.pread(fd, len(blob), 0) == blob        # still there for node 1
            os.pwrite(fd, b"still writable", 100)
            os.fsync(fd)
            assert os.pread(fd, 14, 100) == b"still writable"
            assert os.fstat(fd).st_nlink == 0
            held = os.statvfs(c.path(3, ".")).f_bfree
            assert held <= before - len(blob) // 4096          # not freed while open
        finally:
            os.close(fd)
        deadline = 50
        while os.statvfs(c.path(3, ".")).f_bfree < before - 16 and deadline:
            deadline -= 1
            __import__("time").sleep(0.1)
        assert os.statvfs(c.path(3, ".")).f_bfree >= before - 16   # freed at the close
