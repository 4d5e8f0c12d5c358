#!/usr/bin/env python3
"""Cluster benchmark: a 3-node clusterfs against one node, ext4 and GlusterFS.

    python3 tools/clusterbench.py [--quick] [--files 10000] [--size-mib 1024]
                                  [--only cluster|onenode|ext4|gluster] [--workload NAME]
                                  [--backing-dir DIR] [--rand-ops N] [--pause S]

The systems, each on its own loop device of the same size over a sparse file in one
backing directory (/dev/shm when it has room, like tools/bench.py):

  cluster  3 `clusterfs mount --config --node-id K` processes on one device
           (tests/clusterutil.py); "node 1" and "node 2" are two of them, the third
           mounts and idles;
  onenode  one `clusterfs mount` (no --config) of an equal device; "node 1" and
           "node 2" are both that one mount (two processes on it);
  ext4     the kernel's ext4, likewise two processes on one mount;
  gluster  GlusterFS when installed (`apt-get install -y glusterfs-server`; a benchmark
           peer, not a dependency): a glusterd of our own, a one-brick volume on an ext4
           loop device of the same size, mounted twice (`mount -t glusterfs`), the two
           mounts being "node 1" and "node 2".

Every measured operation runs in worker processes (fork) doing real syscalls on the
mountpoints; the workers of one step start together at a barrier, and a figure is the
total work divided by the time from the first start to the last finish. The workloads
(names for --workload):

  create-shared  2 nodes create FILES empty files (FILES/2 each) in ONE directory at once,
                 each then fsyncs the directory; files/s in total
  create-private the same, each node in a directory of its own
  create         1 node creates FILES files in one directory (bench.py's creates)
  stat-local     node 1 stats the FILES files it created in `create`
  stat-remote    node 2 stats those same files (after stat-local)
  list-remote    node 1 creates FILES files in a new directory; node 2 lists it as
                 `ls -l` does (readdir, then a stat of every entry); entries/s
  write-shared-1m / write-shared-64k
                 2 nodes write disjoint halves of one new file at once in 1 MiB / 64 KiB
                 pwrites, then fsync; MiB/s in total
  write-1m / write-64k
                 1 node writes the whole file alone, the same way
  overwrite-shared-64k
                 2 nodes overwrite disjoint halves of an existing, fsync'd file at once
                 in 64 KiB pwrites, then fsync (byte-range data locks); MiB/s in total
  overwrite-64k  1 node overwrites that whole file alone, the same way
  seq-write      SIZE MiB in 1 MiB write() calls + fsync on node 1 (bench.py's)
  seq-read       that file read in 1 MiB read() calls after a remount of node 1
  rand-fsync / rand-fdatasync
                 4 KiB pwrites at random 4 KiB-aligned offsets into an existing,
                 fsync'd file, each followed by fsync / fdatasync; operations/s

Each step starts after a pause (--pause, default 2 s, --quick 0.5 s) so that the last
step's background commit is not measured; on the cluster its progress line also counts
the glocks the nodes gave up or down-converted during it (`clusterfs status`), the lock
traffic it caused.
It prints a progress line per step, then a table with the ratios cluster/onenode,
cluster/ext4 and cluster/gluster, then the aims and whether this run meets them. It
needs root. Loop devices, mounts and processes it made are removed on exit, also on
failure, Ctrl-C or SIGTERM. Exit status 1 when any step failed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE))

import bench  # noqa: E402
import clusterutil  # noqa: E402
import mountutil  # noqa: E402

MiB = 1 << 20
SYSTEMS = ("cluster", "onenode", "ext4", "gluster")
GLUSTER_INSTALL = "apt-get install -y glusterfs-server"
WORKER_TIMEOUT = 1800.0


@dataclass(frozen=True)
class Workload:
    name: str
    label: str
    unit: str
    nodes: int          # 2: two nodes (or two processes) at once; 1: node 1 alone
    private: bool       # counts for the "3-node cluster loses at most 10%" aim


WORKLOADS = [
    Workload("create-shared", "create, 2 nodes, one shared dir", "files/s", 2, False),
    Workload("create-private", "create, 2 nodes, a dir each", "files/s", 2, True),
    Workload("create", "create, 1 node, one dir", "files/s", 1, True),
    Workload("stat-local", "stat own files, creating node", "stats/s", 1, True),
    Workload("stat-remote", "stat files another node made", "stats/s", 1, False),
    Workload("list-remote", "ls -l of a dir another node made", "entries/s", 1, False),
    Workload("write-shared-1m", "one file, 2 nodes, 1 MiB pwrites", "MiB/s", 2, False),
    Workload("write-1m", "one file, 1 node, 1 MiB pwrites", "MiB/s", 1, True),
    Workload("write-shared-64k", "one file, 2 nodes, 64 KiB pwrites", "MiB/s", 2, False),
    Workload("write-64k", "one file, 1 node, 64 KiB pwrites", "MiB/s", 1, True),
    Workload("overwrite-shared-64k", "overwrite one file, 2 nodes, 64 KiB", "MiB/s", 2,
             False),
    Workload("overwrite-64k", "overwrite one file, 1 node, 64 KiB", "MiB/s", 1, True),
    Workload("seq-write", "sequential write 1 MiB + fsync", "MiB/s", 1, True),
    Workload("seq-read", "sequential read after remount", "MiB/s", 1, True),
    Workload("rand-fsync", "4 KiB random overwrite + fsync", "ops/s", 1, True),
    Workload("rand-fdatasync", "4 KiB random overwrite + fdatasync", "ops/s", 1, True),
]
BY_NAME = {w.name: w for w in WORKLOADS}


@dataclass
class Params:
    files: int
    size_mib: int
    rand_file_mib: int
    rand_ops: int


def log(msg: str) -> None:
    print(msg, flush=True)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else repr(exc)


# ----------------------------------------------------------------------------
# worker processes: each function gets `start` (wait at the barrier, returns the start
# time) and returns (start, end) in time.monotonic(), the same clock in every process


def _w_creates(start, directory: str, prefix: str, n: int):
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    try:
        t0 = start()
        for i in range(n):
            os.close(os.open(f"{prefix}{i:07d}", flags, 0o644, dir_fd=dfd))
        os.fsync(dfd)
        return t0, time.monotonic()
    finally:
        os.close(dfd)


def _w_stats(start, directory: str, prefix: str, n: int):
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        t0 = start()
        for i in range(n):
            os.stat(f"{prefix}{i:07d}", dir_fd=dfd, follow_symlinks=False)
        return t0, time.monotonic()
    finally:
        os.close(dfd)


def _w_list(start, directory: str):
    """ls -l: read the directory, stat every entry; returns the entries seen too."""
    t0 = start()
    seen = 0
    with os.scandir(directory) as it:
        for entry in it:
            entry.stat(follow_symlinks=False)
            seen += 1
    return t0, time.monotonic()


def _w_pwrite(start, path: str, offset: int, length: int, bs: int):
    buf = os.urandom(bs)
    fd = os.open(path, os.O_WRONLY)
    try:
        t0 = start()
        end = offset + length
        while offset < end:
            view = memoryview(buf)[:min(bs, end - offset)]
            while view:
                n = os.pwrite(fd, view, offset)
                offset += n
                view = view[n:]
        os.fsync(fd)
        return t0, time.monotonic()
    finally:
        os.close(fd)


def _w_seq_write(start, path: str, size_mib: int):
    buf = os.urandom(MiB)
    t0 = start()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for _ in range(size_mib):
            view = memoryview(buf)
            while view:
                view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    return t0, time.monotonic()


def _w_seq_read(start, path: str, size_mib: int):
    total = 0
    t0 = start()
    fd = os.open(path, os.O_RDONLY)
    try:
        while chunk := os.read(fd, MiB):
            total += len(chunk)
    finally:
        os.close(fd)
    t1 = time.monotonic()
    if total != size_mib * MiB:
        raise RuntimeError(f"read back {total} bytes of {size_mib * MiB}")
    return t0, t1


def _w_random(start, path: str, file_bytes: int, ops: int, sync: str):
    rng = random.Random(ops)
    blocks = file_bytes // 4096
    offsets = [rng.randrange(blocks) * 4096 for _ in range(ops)]
    buf = os.urandom(4096)
    flush = os.fsync if sync == "fsync" else os.fdatasync
    fd = os.open(path, os.O_WRONLY)
    try:
        t0 = start()
        for off in offsets:
            if os.pwrite(fd, buf, off) != 4096:
                raise RuntimeError(f"short pwrite at {off}")
            flush(fd)
        return t0, time.monotonic()
    finally:
        os.close(fd)


def _worker_main(index: int, fn, args, barrier, queue) -> None:
    def start() -> float:
        barrier.wait(timeout=WORKER_TIMEOUT)
        return time.monotonic()
    try:
        t0, t1 = fn(start, *args)
        queue.put((index, None, t0, t1))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        with contextlib.suppress(Exception):
            barrier.abort()
        queue.put((index, f"{type(exc).__name__}: {_first_line(exc)}", 0.0, 0.0))


def run_workers(jobs: list[tuple[Callable, tuple]]) -> float:
    """Run each (fn, args) in its own process, all starting at one barrier; the wall
    time from the first start to the last end."""
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(len(jobs))
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker_main, args=(i, fn, args, barrier, queue), daemon=True)
             for i, (fn, args) in enumerate(jobs)]
    try:
        for p in procs:
            p.start()
        results = [queue.get(timeout=WORKER_TIMEOUT) for _ in procs]
        for p in procs:
            p.join(30)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()            # our own worker, by its pid
                p.join(10)
    errors = [err for _i, err, _t0, _t1 in results if err]
    if errors:
        raise RuntimeError(errors[0])
    return max(r[3] for r in results) - min(r[2] for r in results)


# ----------------------------------------------------------------------------
# the systems under test: "node 1" and "node 2" are mountpoints


class System:
    name = ""
    label = ""

    def mp(self, node: int) -> str:
        raise NotImplementedError

    def remount(self, node: int) -> None:
        raise NotImplementedError



class LocalSystem(System):
    """One mount (clusterfs without --config, or ext4); both "nodes" are that mount."""

    def __init__(self, kind: str, stack: contextlib.ExitStack, base: str,
                 device_bytes: int) -> None:
        self.name = "onenode" if kind == "clusterfs" else "ext4"
        self.kind = kind
        why = mountutil.missing_prerequisites(kind)
        if why:
            raise RuntimeError(why)
        self.dev = stack.enter_context(mountutil.loop_device(device_bytes, base))
        if kind == "clusterfs":
            mountutil.mkfs(self.dev, journals=3, force=True)   # the cluster device's layout
        else:
            mountutil.mkfs(self.dev, fs="ext4")
        self.mnt_dir = os.path.join(base, "mnt")
        self.m = self._mount()
        stack.callback(self._unmount)

    def _mount(self) -> mountutil.Mount:
        return mountutil.start_mount(self.dev, self.mnt_dir, self.kind)

    def _unmount(self) -> None:
        if self.m.mountpoint in mountutil._REGISTRY.mounts:
            self.m.unmount()

    def mp(self, node: int) -> str:
        return self.m.mountpoint

    def remount(self, node: int) -> None:
        self.m.unmount()
        self.m = self._mount()
        bench._drop_caches()


class ClusterSystem(System):
    """Three clusterfs nodes on one device (tests/clusterutil.py); fsck clean at the end."""

    name = "cluster"

    def __init__(self, stack: contextlib.ExitStack, base: str, device_bytes: int) -> None:
        why = mountutil.missing_prerequisites("clusterfs")
        if why:
            raise RuntimeError(why)
        self.c = stack.enter_context(clusterutil.cluster(Path(base), nodes=3,
                                                         size=device_bytes))
        self.settle()

    def mp(self, node: int) -> str:
        return self.c.mountpoint(node)

    def remount(self, node: int) -> None:
        self.c.unmount(node)
        self.c.start(node)
        bench._drop_caches()
        self.settle()

    def _status(self, node: int) -> dict | None:
        r = mountutil.run_cli("status", "--control", self.c.control(node), "--json",
                              timeout=30)
        if r.returncode != 0:
            return None
        try:
            return json.loads(r.stdout)
        except ValueError:
            return None

    def demotes(self) -> int | None:
        """Glocks given up or down-converted so far by the cluster's nodes (from
        `clusterfs status`), to show the lock traffic a step caused."""
        total = 0
        for n in self.c.node_ids:
            st = self._status(n)
            g = (st or {}).get("mount", {}).get("glock_stats")
            if not g:
                return None
            total += g.get("demoted", 0) + g.get("down_converted", 0)
        return total

    def settle(self, timeout: float = 60.0) -> None:
        """Until every node has seen the same full view for 2 s, with locking running and
        no journal recovery pending (after a remount the others first see a departure)."""
        deadline = time.monotonic() + timeout
        stable_since, last = None, None
        while time.monotonic() < deadline:
            sts = [self._status(n) for n in self.c.node_ids]
            ok = all(st and st.get("quorate") and st.get("running")
                     and st.get("mount", {}).get("locks_usable", True)
                     and sorted(st.get("members", [])) == self.c.node_ids for st in sts)
            gens = {st.get("generation") for st in sts if st}
            key = (ok, tuple(gens))
            if ok and len(gens) == 1:
                if key != last:
                    stable_since = time.monotonic()
                elif time.monotonic() - stable_since >= 2.0:
                    return
            last = key
            time.sleep(0.25)
        raise RuntimeError(f"the cluster did not settle within {timeout:.0f}s")


class GlusterUnavailable(Exception):
    pass


class GlusterMount(mountutil.Mount):
    """A glusterfs FUSE mount, registered with mountutil so that even a killed bench
    leaves none behind (its guardian lazily unmounts what is registered)."""

    def _clean_unmount(self, timeout: float) -> None:
        r = subprocess.run(["umount", self.mountpoint], capture_output=True, text=True,
                           timeout=timeout)
        if r.returncode != 0:
            raise AssertionError(f"umount {self.mountpoint}: {r.stderr.strip()}")

    def force_unmount(self) -> None:
        if mountutil._is_mounted(self.mountpoint):
            r = subprocess.run(["umount", self.mountpoint], capture_output=True)
            if r.returncode != 0:
                subprocess.run(["umount", "-l", self.mountpoint], capture_output=True)
        self._forget()


def _port_in_use(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex((host, port)) == 0


class GlusterSystem(System):
    """Our own glusterd (its working directory in our temp dir, stopped by its pid), a
    one-brick volume on an ext4 loop device, mounted twice."""

    name = "gluster"
    HOST = "127.0.0.2"   # the CLI refuses 127.0.0.1 as a brick host

    def __init__(self, stack: contextlib.ExitStack, base: str, device_bytes: int) -> None:
        self.base = base
        self.vol = f"cbench{os.getpid()}"
        self.glusterd: subprocess.Popen | None = None
        self.mounts: dict[int, GlusterMount] = {}
        glusterd = shutil.which("glusterd") or "/usr/sbin/glusterd"
        if not os.path.exists(glusterd) or shutil.which("gluster") is None:
            raise GlusterUnavailable(f"not installed; for the comparison: {GLUSTER_INSTALL}")
        if not os.path.exists("/dev/fuse"):
            raise GlusterUnavailable("/dev/fuse missing")
        if _port_in_use("127.0.0.1", 24007):
            raise GlusterUnavailable("another glusterd listens on port 24007 (not ours; "
                                     "left alone)")
        # the brick on ext4 over a loop device of the same size, like the others
        dev = stack.enter_context(mountutil.loop_device(device_bytes, base, "brick.img"))
        mountutil.mkfs(dev, fs="ext4")
        brick_fs = mountutil.start_mount(dev, os.path.join(base, "brickfs"), "ext4")
        stack.callback(lambda: brick_fs.mountpoint in mountutil._REGISTRY.mounts
                       and brick_fs.unmount())
        self.brick = os.path.join(brick_fs.mountpoint, "brick")
        os.mkdir(self.brick)
        stack.callback(self._teardown)
        self._start_glusterd()
        r = self._cli("volume", "create", self.vol, f"{self.HOST}:{self.brick}", "force")
        if r.returncode != 0:
            raise GlusterUnavailable(f"volume create: {(r.stdout + r.stderr).strip()}")
        self.created = True
        r = self._cli("volume", "start", self.vol)
        if r.returncode != 0:
            raise GlusterUnavailable(f"volume start: {(r.stdout + r.stderr).strip()}")
        for n in (1, 2):
            self._mount(n)

    created = False

    def _cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(["gluster", "--mode=script", *args], capture_output=True,
                               text=True, timeout=timeout)

    def _start_glusterd(self) -> None:
        wd = os.path.join(self.base, "glusterd")
        os.mkdir(wd)
        volfile = os.path.join(self.base, "glusterd.vol")
        with open("/etc/glusterfs/glusterd.vol") as f:
            text = f.read().replace("/var/lib/glusterd", wd)
        with open(volfile, "w") as f:
            f.write(text)
        self.glusterd = subprocess.Popen(
            ["glusterd", "-N", "-f", volfile, "-l", os.path.join(self.base, "glusterd.log"),
             "-p", os.path.join(self.base, "glusterd.pid")],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True, preexec_fn=mountutil._die_with_parent)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.glusterd.poll() is not None:
                raise GlusterUnavailable(f"glusterd exited with {self.glusterd.returncode}; "
                                         f"see {self.base}/glusterd.log")
            if self._cli("volume", "list", timeout=10).returncode == 0:
                return
            time.sleep(0.2)
        raise GlusterUnavailable("glusterd did not answer within 30 s")

    def _mount(self, node: int) -> None:
        mp = os.path.join(self.base, f"gnode{node}")
        os.makedirs(mp, exist_ok=True)
        r = subprocess.run(["mount", "-t", "glusterfs", "-o",
                            f"log-file={self.base}/gnode{node}.client.log",
                            f"{self.HOST}:/{self.vol}", mp],
                           capture_output=True, text=True, timeout=120)
        m = GlusterMount(fs="glusterfs", device=f"{self.HOST}:/{self.vol}", mountpoint=mp,
                         log=f"{self.base}/gnode{node}.client.log")
        if mountutil._is_mounted(mp):
            mountutil._REGISTRY.add_mount(m)
        if r.returncode != 0:
            raise GlusterUnavailable(f"mount -t glusterfs: {(r.stdout + r.stderr).strip()}")
        self.mounts[node] = m

    def mp(self, node: int) -> str:
        return self.mounts[node].mountpoint

    def remount(self, node: int) -> None:
        self.mounts.pop(node).unmount()
        self._mount(node)
        bench._drop_caches()

    def _brick_pids(self) -> list[int]:
        d = f"/var/run/gluster/vols/{self.vol}"
        pids = []
        with contextlib.suppress(OSError):
            for name in os.listdir(d):
                with contextlib.suppress(OSError, ValueError):
                    pid = int(Path(d, name).read_text().strip())
                    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                    if self.vol.encode() in cmdline:      # still our brick process
                        pids.append(pid)
        return pids

    def _teardown(self) -> None:
        for m in list(self.mounts.values()):
            with contextlib.suppress(Exception):
                m.force_unmount()
        self.mounts.clear()
        if self.created and self.glusterd is not None and self.glusterd.poll() is None:
            bricks = self._brick_pids()
            self._cli("volume", "stop", self.vol, "force")
            self._cli("volume", "delete", self.vol)
            for pid in bricks:                   # only if stop left it running
                with contextlib.suppress(OSError):   # (gone since: FileNotFoundError)
                    if self.vol.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                        os.kill(pid, signal.SIGKILL)
        if self.glusterd is not None and self.glusterd.poll() is None:
            self.glusterd.terminate()
            try:
                self.glusterd.wait(15)
            except subprocess.TimeoutExpired:
                self.glusterd.kill()
                self.glusterd.wait(10)
        # what glusterd left outside our directory, named after our volume and brick
        with contextlib.suppress(OSError):
            os.rmdir(f"/var/run/gluster/vols/{self.vol}")
        brick_log = self.brick.strip("/").replace("/", "-") + ".log"
        with contextlib.suppress(OSError):
            os.unlink(f"/var/log/glusterfs/bricks/{brick_log}")


# ----------------------------------------------------------------------------
# the workloads, driven from the parent, measured in workers


def _mkdir(path: str) -> str:
    os.mkdir(path)
    return path


def _make_file(path: str) -> str:
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    return path


def measure(sysm: System, w: Workload, p: Params) -> tuple[float, str]:
    """One step on one system: (figure, detail)."""
    n1, n2 = sysm.mp(1), sysm.mp(2)
    half = p.files // 2
    if w.name == "create-shared":
        _mkdir(os.path.join(n1, "cshared"))
        dt = run_workers([(_w_creates, (os.path.join(n1, "cshared"), "a", half)),
                          (_w_creates, (os.path.join(n2, "cshared"), "b", half))])
        _check_count(os.path.join(n1, "cshared"), 2 * half)
        return 2 * half / dt, f"{2 * half} files in {dt:.2f} s"
    if w.name == "create-private":
        _mkdir(os.path.join(n1, "cpriv1"))
        _mkdir(os.path.join(n2, "cpriv2"))
        dt = run_workers([(_w_creates, (os.path.join(n1, "cpriv1"), "a", half)),
                          (_w_creates, (os.path.join(n2, "cpriv2"), "b", half))])
        return 2 * half / dt, f"{2 * half} files in {dt:.2f} s"
    if w.name == "create":
        _mkdir(os.path.join(n1, "csingle"))
        dt = run_workers([(_w_creates, (os.path.join(n1, "csingle"), "f", p.files))])
        _check_count(os.path.join(n1, "csingle"), p.files)
        return p.files / dt, f"{p.files} files in {dt:.2f} s"
    if w.name in ("stat-local", "stat-remote"):
        node = n1 if w.name == "stat-local" else n2
        d = os.path.join(n1, "cstat")
        if not os.path.isdir(d):      # made by node 1, once, for both stat steps
            _mkdir(d)
            run_workers([(_w_creates, (d, "f", p.files))])
            time.sleep(2.0)           # their background commit, not part of the stats
        dt = run_workers([(_w_stats, (os.path.join(node, "cstat"), "f", p.files))])
        return p.files / dt, f"{p.files} stats in {dt:.2f} s"
    if w.name == "list-remote":
        d = os.path.join(n1, "clist")
        _mkdir(d)
        run_workers([(_w_creates, (d, "f", p.files))])
        time.sleep(2.0)               # their background commit, not part of the listing
        dt = run_workers([(_w_list, (os.path.join(n2, "clist"),))])
        _check_count(os.path.join(n2, "clist"), p.files)
        return p.files / dt, f"{p.files} entries in {dt:.2f} s"
    if w.name.startswith("overwrite-"):
        path = os.path.join(n1, "overfile")
        size = p.size_mib * MiB
        if not os.path.exists(path):
            run_workers([(_w_seq_write, (path, p.size_mib))])
        n2_path = os.path.join(n2, "overfile")
        if w.nodes == 2:
            jobs = [(_w_pwrite, (path, 0, size // 2, 64 << 10)),
                    (_w_pwrite, (n2_path, size // 2, size - size // 2, 64 << 10))]
        else:
            jobs = [(_w_pwrite, (path, 0, size, 64 << 10))]
        dt = run_workers(jobs)
        if os.stat(path).st_size != size:
            raise RuntimeError(f"overfile is {os.stat(path).st_size} bytes, not {size}")
        return p.size_mib / dt, f"{p.size_mib} MiB overwritten in {dt:.2f} s"
    if w.name.startswith("write-"):
        bs = MiB if w.name.endswith("1m") else 64 << 10
        name = w.name.replace("-", "")
        size = p.size_mib * MiB
        _make_file(os.path.join(n1, name))
        if w.nodes == 2:
            jobs = [(_w_pwrite, (os.path.join(n1, name), 0, size // 2, bs)),
                    (_w_pwrite, (os.path.join(n2, name), size // 2, size - size // 2, bs))]
        else:
            jobs = [(_w_pwrite, (os.path.join(n1, name), 0, size, bs))]
        dt = run_workers(jobs)
        detail = f"{p.size_mib} MiB in {dt:.2f} s"
        got = os.stat(os.path.join(n1, name)).st_size
        if got != size and isinstance(sysm, GlusterSystem):
            # GlusterFS's client caches attributes (md-cache, 1 s by default): node 1 may
            # not see node 2's extension of the file at once, even after its fsync
            time.sleep(2.0)
            stale, got = got, os.stat(os.path.join(n1, name)).st_size
            if got == size:
                detail += (f"; node 1 saw {stale} bytes right after both fsyncs, "
                           f"{size} 2 s later (GlusterFS client attribute cache)")
        if got != size:
            raise RuntimeError(f"{name} is {got} bytes, not {size}")
        return p.size_mib / dt, detail
    if w.name == "seq-write":
        dt = run_workers([(_w_seq_write, (os.path.join(n1, "seqfile"), p.size_mib))])
        return p.size_mib / dt, f"{p.size_mib} MiB in {dt:.2f} s"
    if w.name == "seq-read":
        path = os.path.join(n1, "seqfile")
        if not os.path.exists(path):
            run_workers([(_w_seq_write, (path, p.size_mib))])
        t0 = time.monotonic()
        sysm.remount(1)
        remount_s = time.monotonic() - t0
        dt = run_workers([(_w_seq_read, (os.path.join(sysm.mp(1), "seqfile"), p.size_mib))])
        return p.size_mib / dt, (f"{p.size_mib} MiB in {dt:.2f} s, after a remount of node 1 "
                                 f"that took {remount_s:.1f} s")
    if w.name in ("rand-fsync", "rand-fdatasync"):
        path = os.path.join(n1, "randfile")
        if not os.path.exists(path):
            run_workers([(_w_seq_write, (path, p.rand_file_mib))])
        sync = w.name.split("-")[1]
        dt = run_workers([(_w_random, (path, p.rand_file_mib * MiB, p.rand_ops, sync))])
        return p.rand_ops / dt, (f"{p.rand_ops} x 4 KiB in a {p.rand_file_mib} MiB file "
                                 f"in {dt:.2f} s")
    raise ValueError(w.name)


def _show_statfs(sysm: ClusterSystem) -> None:
    """After a failed cluster step: what each node's statfs says (an ENOSPC on a device
    with room shows here)."""
    for n in sysm.c.node_ids:
        with contextlib.suppress(OSError):
            st = os.statvfs(sysm.mp(n))
            log(f"    node {n} statfs: {st.f_bavail * st.f_frsize // MiB} MiB free of "
                f"{st.f_blocks * st.f_frsize // MiB}, {st.f_ffree} inodes free")


def _check_count(directory: str, n: int) -> None:
    got = len(os.listdir(directory))
    if got != n:
        raise RuntimeError(f"{directory}: {got} entries, {n} created")


# ----------------------------------------------------------------------------


def run_system(name: str, workloads: list[Workload], p: Params, backing: str,
               device_bytes: int, results: dict, failed: list[str],
               pause: float) -> str | None:
    """Measure every workload on one system into results[name]; returns a reason when
    the system is not available (GlusterFS only), else None."""
    base = tempfile.mkdtemp(prefix="cbench-", dir=backing)
    results[name] = {}
    try:
        with contextlib.ExitStack() as stack:
            t0 = time.monotonic()
            try:
                if name == "cluster":
                    sysm: System = ClusterSystem(stack, base, device_bytes)
                elif name == "onenode":
                    sysm = LocalSystem("clusterfs", stack, base, device_bytes)
                elif name == "ext4":
                    sysm = LocalSystem("ext4", stack, base, device_bytes)
                else:
                    sysm = GlusterSystem(stack, base, device_bytes)
            except GlusterUnavailable as exc:
                return str(exc)
            log(f"  {name}: set up in {time.monotonic() - t0:.1f} s")
            for w in workloads:
                try:
                    time.sleep(pause)     # the last step's background commit (2 s timer)
                    before = sysm.demotes() if isinstance(sysm, ClusterSystem) else None
                    fig, detail = measure(sysm, w, p)
                    after = sysm.demotes() if isinstance(sysm, ClusterSystem) else None
                    if before is not None and after is not None and w.name != "seq-read":
                        detail += f", {after - before} glock demotes"
                except Exception as exc:  # noqa: BLE001 - reported, the run goes on
                    failed.append(f"{name} {w.name}")
                    log(f"  {name}: {w.name}: FAILED: {_first_line(exc)}")
                    if isinstance(sysm, ClusterSystem):
                        _show_statfs(sysm)
                        for line in sysm.c.logs().splitlines()[-400:]:
                            if line.startswith("---") or " WARNING " in line \
                                    or " ERROR " in line:
                                log(f"    {line[:300]}")
                    if isinstance(sysm, ClusterSystem) and len(sysm.c.mounts) < 3:
                        raise
                    continue
                results[name][w.name] = fig
                log(f"  {name}: {w.label}: {fig:.0f} {w.unit} ({detail})")
            t1 = time.monotonic()
        log(f"  {name}: torn down in {time.monotonic() - t1:.1f} s")
    except (Exception, AssertionError) as exc:  # noqa: B014
        failed.append(name)
        log(f"  {name}: FAILED: {_first_line(exc)}")
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return None


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def _fr(r: float | None) -> str:
    if r is None:
        return "-"
    return f"{r:.3f}" if r < 0.1 else f"{r:.2f}"


def table(results: dict, workloads: list[Workload]) -> str:
    head = ["workload", "unit", "3-node cfs", "1-node cfs", "ext4", "GlusterFS",
            "cl/1node", "cl/ext4", "cl/gluster"]
    lines = [head]
    for w in workloads:
        c, o, e, g = (results.get(s, {}).get(w.name) for s in SYSTEMS)
        lines.append([w.name, w.unit, bench._fmt(c), bench._fmt(o), bench._fmt(e),
                      bench._fmt(g), _fr(_ratio(c, o)), _fr(_ratio(c, e)), _fr(_ratio(c, g))])
    widths = [max(len(r[i]) for r in lines) for i in range(len(head))]
    return "\n".join("  ".join(cell.ljust(wd) if i < 2 else cell.rjust(wd)
                               for i, (cell, wd) in enumerate(zip(r, widths, strict=True)))
                     for r in lines)


def aims(results: dict, workloads: list[Workload]) -> list[str]:
    out = []
    cl, one, gl = (results.get(s, {}) for s in ("cluster", "onenode", "gluster"))

    def verdict(ok: bool | None) -> str:
        return "not measured" if ok is None else ("MET" if ok else "NOT MET")

    a, b = cl.get("create-shared"), one.get("create")
    r = _ratio(a, b)
    out.append(f"aim 1, two nodes creating in one shared dir at least as fast as one node "
               f"alone (3-node create-shared / 1-node create): "
               f"{bench._fmt(a)} / {bench._fmt(b)} files/s = {_fr(r)}: "
               f"{verdict(None if r is None else r >= 1.0)}"
               f" (against one node of the 3-node cluster alone, {bench._fmt(cl.get('create'))}"
               f" files/s: {_fr(_ratio(a, cl.get('create')))})")
    rows = [(w.name, _ratio(cl.get(w.name), one.get(w.name)))
            for w in workloads if w.private]
    measured = [(n, r) for n, r in rows if r is not None]
    worst = [f"{n} {r:.2f}" for n, r in measured if r < 0.90]
    out.append("aim 2, the 3-node cluster loses at most 10% against one node on private "
               "workloads (3-node / 1-node >= 0.90 for "
               f"{', '.join(n for n, _ in rows)}): "
               + (verdict(None) if not measured else
                  verdict(not worst) + (f" (below: {', '.join(worst)})" if worst else "")))
    rows = [(w.name, _ratio(cl.get(w.name), gl.get(w.name))) for w in workloads]
    measured = [(n, r) for n, r in rows if r is not None]
    behind = [f"{n} {r:.2f}" for n, r in measured if r <= 1.0]
    out.append("aim 3, every workload ahead of GlusterFS (3-node / GlusterFS > 1): "
               + (verdict(None) if not measured else
                  verdict(not behind) + (f" (behind: {', '.join(behind)})" if behind else "")))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="small sizes (64 MiB files, 1000 creates, 200 random writes)")
    p.add_argument("--files", type=int, default=None,
                   help="files per create/stat step (default 10000, --quick 1000)")
    p.add_argument("--size-mib", type=int, default=None,
                   help="file size of the write/read steps in MiB (default 1024, --quick 64)")
    p.add_argument("--rand-ops", type=int, default=None,
                   help="random 4 KiB overwrites per step (default 2000, --quick 200)")
    p.add_argument("--pause", type=float, default=None,
                   help="seconds to wait before each step (default 2, --quick 0.5)")
    p.add_argument("--only", choices=SYSTEMS, action="append",
                   help="run only this system (repeatable)")
    p.add_argument("--workload", choices=[w.name for w in WORKLOADS], action="append",
                   help="run only this workload (repeatable; stat-remote, seq-read and the "
                        "rand-* steps make their own input when run alone)")
    p.add_argument("--backing-dir", default=None,
                   help="where the loop devices' sparse backing files and the mountpoints "
                        "go; default /dev/shm when it has room, else $TMPDIR or /var/tmp")
    args = p.parse_args(argv)
    quick = args.quick
    prm = Params(files=args.files or (1000 if quick else 10_000),
                 size_mib=args.size_mib or (64 if quick else 1024),
                 rand_file_mib=16 if quick else 64,
                 rand_ops=args.rand_ops or (200 if quick else 2000))
    prm.rand_file_mib = min(prm.rand_file_mib, max(1, prm.size_mib))
    pause = args.pause if args.pause is not None else (0.5 if quick else 2.0)
    systems = [s for s in SYSTEMS if not args.only or s in args.only]
    workloads = [w for w in WORKLOADS if not args.workload or w.name in args.workload]
    # every file the steps leave (5 files of SIZE, the random file, 4 x FILES inodes)
    # plus journals and room
    device_bytes = ((5 * prm.size_mib + prm.rand_file_mib) * MiB * 5) // 4 \
        + 4 * prm.files * 8192 + 512 * MiB
    images = 1    # one system at a time, each removed before the next
    backing = bench.choose_backing(args.backing_dir, device_bytes, images)

    def on_term(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_term)

    log(f"clusterbench: {prm.size_mib} MiB files, {prm.files} files per create/stat step, "
        f"{prm.rand_ops} random 4 KiB writes in {prm.rand_file_mib} MiB, loop devices of "
        f"{device_bytes // MiB} MiB, {bench._load()}")
    log(f"clusterbench: backing files in {backing} ({bench._backing_kind(backing)}); "
        f"systems {', '.join(systems)}")
    if "gluster" in systems and shutil.which("gluster") is None:
        log(f"clusterbench: GlusterFS is a benchmark peer, not a dependency; to compare "
            f"with it: {GLUSTER_INSTALL}")
    results: dict[str, dict[str, float]] = {}
    failed: list[str] = []
    unavailable: dict[str, str] = {}
    try:
        for s in systems:
            log(f"clusterbench: {s}, {bench._load()}")
            why = run_system(s, workloads, prm, backing, device_bytes, results, failed,
                             pause=pause)
            if why:
                unavailable[s] = why
                log(f"GlusterFS: not available ({why})")
    except KeyboardInterrupt:
        log("clusterbench: interrupted; everything it made is removed")
        return 130
    finally:
        leaked = mountutil.cleanup_all()
        if leaked:
            print(f"clusterbench: cleaned up {', '.join(leaked)}", file=sys.stderr)
    log(f"clusterbench: done, {bench._load()}")
    print()
    print(table(results, workloads))
    print("(3-node cfs: nodes 1 and 2 of the cluster, node 3 mounted and idle; 1-node cfs and "
          "ext4: the two \"nodes\" are two processes on one mount; GlusterFS: two mounts "
          "of one volume)")
    print()
    for line in aims(results, workloads):
        print(line)
    for s, why in unavailable.items():
        print(f"GlusterFS: not available ({why})" if s == "gluster" else f"{s}: {why}")
    if failed:
        print(f"FAILED: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
