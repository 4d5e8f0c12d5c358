"""A serving node's disk hangs, with real mounts (issue 8, "the path to the disk").

Nodes 1 and 2 serve the disk, node 3 proxies (tests/proxyutil.py). One server reaches
the disk image through a path that can hang for real: a loop device over a file of
a FUSE passthrough of the image served by a process of its own
(tests/hangable_disk.py), which stops itself (SIGSTOP) with one of node 3's writes
in hand: every I/O of that server's path then waits in the kernel (D state), and
SIGCONT lets them all land, that write first. The other server's loop
device is straight over the image, and stays good.

The hung server's block server sees its device I/O outlast disk_timeout and fences
itself (SIGKILL of its own process); but a process with a thread in uninterruptible
I/O does not finish dying until that I/O returns: its sockets stay open, and the
dev cluster's fencing agent (ProcessAgent: done only once the process is gone) cannot
report it fenced. Node 3 re-targets to the other server at once; its writes over
bytes the hung server may still write are held, and its fsync waits, until that
server is gone (docs/storage.md, "Maybe in flight"; docs/recovery.md, "A disk that
hangs in the kernel").
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

import mountutil
import pytest
from clusterutil import Cluster
from proxyutil import BLOB, MIB, ProxyCluster, blob, status, wait_fenced, wait_view

from clusterfs.dlm.interface import resource_key
from clusterfs.dlm.preferred import server_order
from clusterfs.format.block import BLOCK_SIZE
from clusterfs.format.superblock import SUPERBLOCK_BLKNO, decode_superblock
from clusterfs.node.placement import Placement

CHUNKS = 2               # MiB of the file node 3 rewrites
ROUNDS = 12              # rewrites of it without an fsync once the disk hangs (24 MiB:
PACE = 0.05              # well under the proxy's 64 MiB re-send log, which would force
                         # a flush), PACE s apart (as the rounds before: the Python
                         # passthrough is slow enough that a stream of writes queued on
                         # it can outlast a write's start deadline, and a refusal makes
                         # node 3 skip that server before the hang)
IO_TIMEOUT = 1.0         # node 3's wait for a server (a quarter of it on its event
                         # loop, and a write's start deadline half of that): the Python
                         # passthrough is slow, and a refusal before the hang would
                         # make node 3 skip that server (30 s) before it hangs
DISK_TIMEOUT = 1.0       # the hung server stops this long after its write began (the
                         # least allowed: io_timeout), so that it is removed from the
                         # view (failure_timeout 3 s after its last heartbeat) well
                         # before node 3's flush gives up (settle_timeout, 6 s)
HANG_FOR = 5.2           # s: between the two, so the disk comes back while the
                         # survivors try to fence the removed server


@pytest.fixture(autouse=True)
def _prereq():
    mountutil.require_mounts()


class HangablePath:
    """Another path to `image`: a loop device over the file of a FUSE passthrough of
    it (tests/hangable_disk.py), whose I/O hangs, in the kernel, from `hang()` to
    `release()`. The passthrough logs every write it lands (`writes()`)."""

    def __init__(self, image: Path, directory: Path) -> None:
        self.image = image
        self.mountpoint = directory / "hangable"
        self.write_log = directory / "hangable-writes.log"
        self.hung_at: float | None = None
        self.hung_on = b""                 # the first bytes of the write it hung on
        self.released_at: float | None = None

    def __enter__(self) -> str:
        self.mount = mountutil.start_mount(str(self.image), str(self.mountpoint),
                                           fs="hangable", extra_args=[str(self.write_log)])
        try:
            self._loop = mountutil.attach_loop(self.mount.path("disk.img"))
            return self._loop.__enter__()
        except BaseException:
            self.mount.force_unmount()
            raise

    def hang(self, why_not: Callable[[], object], within: float = 10) -> float:
        """Hang the path at the next write of file data through it, with that write in
        hand (hangable_disk.py); returns when it hung (time.time()). `why_not()`: what
        to say if no such write comes."""
        os.kill(self.mount.pid, signal.SIGUSR1)
        deadline = time.monotonic() + within
        while _state(self.mount.pid) != "T":
            assert time.monotonic() < deadline, f"no write came to hang on: {why_not()}"
            time.sleep(0.005)
        hang = next(line.split() for line in self.write_log.read_text().splitlines()
                    if line.startswith("H "))
        self.hung_at, self.hung_on = float(hang[1]), bytes.fromhex(hang[4])
        return self.hung_at

    def release(self) -> None:
        """Let every I/O waiting on this path go on (idempotent)."""
        if self.hung_at is not None and self.released_at is None:
            self.released_at = time.time()       # before: the held write lands at once
        if self.mount.alive():
            os.kill(self.mount.pid, signal.SIGCONT)

    def writes(self) -> list[tuple[float, int, int, bytes]]:
        """(when, offset, length, first 32 bytes) of every write landed through it."""
        out = []
        for line in self.write_log.read_text().splitlines():
            if not line.startswith("W "):
                continue
            _, when, off, length, head = line.split()
            out.append((float(when), int(off), int(length), bytes.fromhex(head)))
        return out

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()
        try:
            self._loop.__exit__(None, None, None)
        finally:
            if kind is None:
                self.mount.unmount()
            else:
                self.mount.force_unmount()


def _state(pid: int) -> str:
    """The state letter of /proc/PID/stat (T: stopped)."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(") ", 1)[1].split()[0]


def _data_server(device: str) -> int:
    """The server node 3's file data goes through: the one the masters name for its
    home resource group (node/placement.py; the rendezvous order of
    dlm/preferred.py). The superblock is read O_DIRECT: a buffered read would leave
    its page in the loop device's cache, where fsck could find it stale later."""
    import mmap

    buf = mmap.mmap(-1, BLOCK_SIZE)
    fd = os.open(device, os.O_RDONLY | os.O_DIRECT)
    try:
        os.preadv(fd, [buf], SUPERBLOCK_BLKNO * BLOCK_SIZE)
    finally:
        os.close(fd)
    sb = decode_superblock(bytes(buf))
    group = Placement(sb, [1, 2, 3]).home_group(3)
    return server_order(resource_key(("rgrp", group)), [1, 2])[0]


# Node 3's writer: rounds of rewrites of the same chunks, each fsynced, until the
# test says the disk is about to hang (HANG_FILE); then ROUNDS more with no fsync
# between them (each write goes to the device as it is made: clusterfs writes file
# data straight through), and one fsync at the end; rounds PACE s apart. Prints when each
# write and the fsync returned.
WRITER = r"""
import hashlib, os, sys, time
path, chunks, rounds, pace, hang_file = sys.argv[1:6]
chunks, rounds, pace = int(chunks), int(rounds), float(pace)
""" + BLOB + r"""fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
r = 0
while True:
    for k in range(chunks):
        os.pwrite(fd, blob(f"{r}-{k}", 1 << 20), k << 20)
    if os.path.exists(hang_file):
        break
    os.fsync(fd)
    print("synced-round", r, flush=True)
    r += 1
    time.sleep(pace)
print("unsynced", r, time.time(), flush=True)
for r in range(r + 1, r + 1 + rounds):
    for k in range(chunks):
        os.pwrite(fd, blob(f"{r}-{k}", 1 << 20), k << 20)
        print("wrote", r, k, time.time(), flush=True)
    time.sleep(pace)
os.fsync(fd)
print("synced", r, time.time(), flush=True)
"""


def _expected(last_round: int) -> bytes:
    return b"".join(blob(f"{last_round}-{k}", MIB) for k in range(CHUNKS))


def _older_heads(last_round: int) -> set[bytes]:
    """The first 32 bytes of every 4 KiB block node 3 wrote before its last round."""
    chunks = (blob(f"{r}-{k}", MIB) for r in range(last_round) for k in range(CHUNKS))
    return {chunk[off:off + 32] for chunk in chunks for off in range(0, MIB, BLOCK_SIZE)}


class ViewWatch:
    """The view and locking state of a node's lockspace, asked every 0.05 s from a
    thread of this process (its control socket) until stopped: when a member left
    the view, and when locking ran again after (recovery waits for the fence)."""

    def __init__(self, control: str) -> None:
        self.control = control
        self.samples: list[tuple[float, list[int], bool]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> ViewWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _watch(self) -> None:
        from clusterfs.node.lockd_cmd import ControlClient

        with ControlClient(self.control, timeout=30) as client:
            while not self._stop.wait(0.05):
                st = client.call("status")
                self.samples.append((time.time(), st["members"], st["running"]))

    def left(self, node: int) -> float | None:
        """When `node` was first seen out of the view."""
        return next((t for t, members, _ in self.samples if node not in members), None)

    def running_again(self, after: float) -> float | None:
        """When locking was first seen running after `after`, having stopped."""
        stopped = next((t for t, _, running in self.samples if t >= after and not running),
                       None)
        if stopped is None:
            return None
        return next((t for t, _, running in self.samples if t > stopped and running), None)


def _write_through_a_hang(c: Cluster, path: HangablePath, hang_for: float, tmp_path: Path
                          ) -> tuple[list[str], int, dict]:
    """Node 3's WRITER rewrites and fsyncs; once it rewrites without fsyncs, the disk
    of the hangable path hangs with one of its writes in hand, and comes back
    `hang_for` s later. (The writer's output lines, its exit code, node 3's device
    status just before the release.)"""
    hang_file = tmp_path / "hang-now"
    w = subprocess.Popen([sys.executable, "-c", WRITER, c.path(3, "w"), str(CHUNKS),
                          str(ROUNDS), str(PACE), str(hang_file)],
                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
    lines: list[str] = []
    try:
        while len(lines) < 2:                   # two rounds written and fsynced
            lines.append(w.stdout.readline())
            assert lines[-1].startswith("synced-round"), (lines, c.logs())
        hang_file.touch()
        while not lines[-1].startswith("unsynced"):
            lines.append(w.stdout.readline())
            assert lines[-1], (lines, c.logs())
        hung_at = path.hang(lambda: status(c, 3)["device"])   # its writes are flowing
        time.sleep(max(0.0, hung_at + hang_for - time.time() - 0.3))
        at_release = status(c, 3)["device"]
        while time.time() < hung_at + hang_for:
            time.sleep(0.01)
        path.release()
        out, _ = w.communicate(timeout=120)
    finally:
        path.release()
        if w.poll() is None:
            w.kill()
            w.wait()
    return lines + out.splitlines(), w.returncode, at_release


def test_a_server_whose_disk_hangs_is_fenced_once_gone_and_its_late_write_lands_under_the_newer(
        tmp_path):
    """The server node 3's data goes through has its disk hang in the kernel, with a
    write of node 3's in hand, for HANG_FOR s, while node 3 rewrites a 2 MiB file
    twelve times without an fsync, then fsyncs. Node 3 re-targets to the other
    server, and holds its newer writes of the bytes the stuck write may still land
    on. The hung server fences itself (SIGKILL) but cannot die while its write is
    stuck: its sockets stay open, its heartbeats stop, the survivors remove it and
    their fence (the process agent) waits for the process to be gone, and node 3's
    fsync waits. Once the disk comes back, the stuck write lands (the passthrough
    logs it), the process goes, the fence is done, and the held writes go out: the
    writer saw no error, and every byte of the file is the newest copy, on node 3
    and on the survivor, which goes on serving."""
    path = HangablePath(tmp_path / "disk.img", tmp_path)
    hung = None

    def own_paths(device: str) -> dict[int, HangablePath]:
        nonlocal hung
        hung = _data_server(device)
        return {hung: path}

    with ProxyCluster(tmp_path, own_paths=own_paths, io_timeout=IO_TIMEOUT,
                      storage=f"disk_timeout = {DISK_TIMEOUT}") as c:
        assert hung is not None
        other = 3 - hung
        with ViewWatch(c.control(other)) as watch:
            lines, rc, at_release = _write_through_a_hang(c, path, HANG_FOR, tmp_path)
            gone_at = wait_fenced(c, hung)
            time.sleep(0.5)                     # the survivors' recovery after the fence
        assert rc == 0 and lines[-1].startswith("synced "), (lines, c.logs())
        last_round, synced = int(lines[-1].split()[1]), float(lines[-1].split()[2])
        hung_at, released_at = path.hung_at, path.released_at
        assert hung_at is not None and released_at is not None
        # the stuck write, of older data, landed after the release, and nothing newer
        # was under it: the file is the newest copy everywhere
        older = _older_heads(last_round)
        assert path.hung_on in older, ("it hung on a write that was not node 3's",
                                       path.hung_on, at_release)
        stale = [w for w in path.writes() if w[0] >= released_at and w[3] in older]
        assert stale, "no write of older data landed after the release"
        expect = _expected(last_round)
        for n in (3, other):
            with open(c.path(n, "w"), "rb") as f:
                assert f.read() == expect, n
        log_hung = (tmp_path / f"node{hung}.clusterfs.log").read_text()
        assert "its disk hangs" in log_hung and "self-fence" in log_hung, log_hung[-3000:]
        # it fenced itself long before, but its process lived on until the disk
        # answered; the survivors removed it meanwhile, and their fence (and so their
        # recovery: locking stopped) was done only once it was gone
        removed_at = watch.left(hung)
        assert removed_at is not None and removed_at < released_at, (
            removed_at, released_at, watch.samples[-3:])
        fenced_at = watch.running_again(removed_at)
        assert fenced_at is not None and fenced_at > released_at, (fenced_at, released_at)
        assert gone_at > released_at
        # node 3 re-targeted at once, and held its newer writes behind the stuck one
        assert at_release["maybe_in_flight"] >= 1 and at_release["held"] >= 1, at_release
        first_retarget = min(t for t in at_release["retarget_times"] if t >= hung_at)
        wrote = [float(x.split()[3]) for x in lines if x.startswith("wrote")]
        print(f"\nserver {hung} (node 3's data) hung {released_at - hung_at:.2f} s with a "
              f"write of node 3's in hand; node 3's first re-targeted I/O "
              f"{first_retarget - hung_at:.3f} s after the hang; its rewrites returned by "
              f"{max(wrote) - hung_at:.2f} s (maybe in flight: "
              f"{at_release['maybe_in_flight']}, held: {at_release['held']}); server "
              f"{hung} removed from node {other}'s view {removed_at - hung_at:.2f} s after "
              f"the hang, fenced (locking again) {fenced_at - hung_at:.2f} s, its process "
              f"gone {gone_at - hung_at:.2f} s; node 3's fsync returned "
              f"{synced - hung_at:.2f} s after the hang; {len(stale)} write(s) of older "
              f"data landed after the release (polled every 0.05 s)")
        print("\n".join(x for x in c.mounts[other].log_text().splitlines()
                        if "fence" in x and f"node {hung}" in x))
        # the survivors go on serving
        wait_view(c, 3, [other, 3])
        with open(c.path(3, "after"), "wb") as f:
            f.write(b"x" * 100000)
            f.flush()
            os.fsync(f.fileno())
        with open(c.path(other, "after"), "rb") as f:
            assert f.read() == b"x" * 100000
