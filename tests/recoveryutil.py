"""Helpers for the node-death tests (tests/test_recovery_stress.py): `tools/stress` runs
on cluster nodes, their durability logs and digests, the nodes' recovery log lines, and
what a device's journals hold.

A stress run is its own process group (`start_new_session`), so a node's death takes its
workload with it: `kill()` signals that group only, by the pid we started.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from clusterutil import Cluster
from mountutil import default_log, run_cli

TOOLS = Path(__file__).resolve().parent.parent / "tools"
STRESS = [sys.executable, str(TOOLS / "stress")]
HANG_GUARD = 300.0      # seconds: a wait that takes this long is a hang, not slowness

# `clusterfs.journal.log` logs one line per replay that found transactions, whoever
# called it (the first mounter, a survivor's recovery, a node replaying its own slot)
_REPLAYED = re.compile(r"clusterfs\.journal\.log: journal (\d+): replayed (\d+) "
                       r"transactions \((\d+) blocks\)")
_RECOVERED = re.compile(r"gen (\d+): journal recovery done in ([\d.]+) s \(DLM ([\d.]+) s, "
                        r"replay ([\d.]+) s\)")
_VERIFY = re.compile(r"verify: \d+ paths: (\d+) ok, (\d+) dirty .*, (\d+) failed")


def wait_for(what: str, ready: Callable[[], bool], timeout: float = HANG_GUARD,
             poll: float = 0.05) -> None:
    """Until ready() is true; AssertionError naming `what` after `timeout` (a hang guard,
    not a measure of speed)."""
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            raise AssertionError(f"still waiting after {timeout:.0f} s for {what}")
        time.sleep(poll)


@dataclass
class StressRun:
    """One `tools/stress run` on one node's mount; output in `out`, durability log in
    `log`. It runs until `stop_file` exists (or `ops` ops per process, if given)."""
    node: int
    root: str
    seed: int
    work: Path                        # where its log, output and stop file go
    private: str | None = None        # default: n<node> (each node its own)
    shared: str | None = "shared"
    procs: int = 2
    ops: int | None = None
    extra: list[str] = field(default_factory=list)
    proc: subprocess.Popen | None = None

    @property
    def log(self) -> Path:
        return self.work / f"stress-n{self.node}-s{self.seed}.log"

    @property
    def out(self) -> Path:
        return self.work / f"stress-n{self.node}-s{self.seed}.out"

    @property
    def stop_file(self) -> Path:
        return self.work / "stop-stress"

    def argv(self) -> list[str]:
        args = [*STRESS, "run", "--dir", self.root, "--seed", str(self.seed),
                "--procs", str(self.procs), "--log", str(self.log), "--progress", "1000",
                "--private", self.private if self.private is not None else f"n{self.node}",
                "--shared", self.shared or "", *self.extra]
        return args + (["--ops", str(self.ops)] if self.ops is not None
                       else ["--stop-file", str(self.stop_file)])

    def start(self) -> StressRun:
        with open(self.out, "wb") as out:
            self.proc = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def output(self) -> str:
        return self.out.read_text(errors="replace")

    def fsyncs(self) -> int:
        """fsync records in its durability log so far."""
        try:
            text = self.log.read_text(errors="replace")
        except FileNotFoundError:
            return 0
        return text.count('"t": "fsync"')

    def clean_fsynced(self) -> int:
        """Paths whose last durability record is an fsync: what verify would check now."""
        last: dict[str, str] = {}
        try:
            with open(self.log) as f:
                for line in f:
                    with contextlib.suppress(ValueError):
                        rec = json.loads(line)
                        if rec.get("t") in ("fsync", "dirty"):
                            last[rec["path"]] = rec["t"]
        except FileNotFoundError:
            return 0
        return sum(1 for t in last.values() if t == "fsync")

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL its whole process group (the run and its workers), as a node's death
        takes its programs with it."""
        if self.running():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(30)

    def finish(self, timeout: float = HANG_GUARD) -> str:
        """Wait for its end (stop file made by the caller); the run must be clean."""
        assert self.proc is not None
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"stress on node {self.node} still running after "
                                 f"{timeout:.0f} s:\n{self.output()[-3000:]}") from None
        text = self.output()
        assert self.proc.returncode == 0 and "stress: 0 failure(s)" in text, (
            f"stress on node {self.node} (seed {self.seed}) exited "
            f"{self.proc.returncode}:\n{text[-6000:]}\n{self.node_complaints()}")
        return text

    def node_complaints(self, most: int = 40) -> str:
        """The last warnings and errors of the mount it ran on (mountutil's log beside
        the mount point): why a call failed is said there, not in the stress output."""
        log = Path(default_log(self.root))
        try:
            lines = log.read_text(errors="replace").splitlines()
        except OSError:
            return f"(no node log at {log})"
        said = [line for line in lines if re.search(r"\b(WARNING|ERROR|CRITICAL)\b", line)]
        return f"node {self.node}'s last warnings and errors ({log.name}):\n" + "\n".join(
            said[-most:])


def stop_all(runs: list[StressRun]) -> None:
    """Tell every run to stop after its current op (they share one stop file)."""
    for r in runs:
        r.stop_file.touch()


def kill_all(runs: list[StressRun]) -> None:
    for r in runs:
        r.kill()


def verify(log: Path, root: str) -> tuple[int, int, int, str]:
    """`stress verify` of a durability log against `root`: (ok, dirty, failed, text)."""
    r = subprocess.run([*STRESS, "verify", "--log", str(log), "--root", root],
                       capture_output=True, text=True, timeout=HANG_GUARD)
    m = _VERIFY.search(r.stdout)
    assert m, f"stress verify said:\n{r.stdout}{r.stderr}"
    ok, dirty, failed = (int(x) for x in m.groups())
    assert (r.returncode == 0) == (failed == 0), r.stdout + r.stderr
    return ok, dirty, failed, r.stdout + r.stderr


def verify_intact(run: StressRun, root: str) -> int:
    """Every file `run` fsync'd (last state) is there, read through `root` (the private
    tree as another, or the restarted, node sees it); the count checked."""
    ok, _dirty, failed, text = verify(run.log, root)
    assert failed == 0, f"node {run.node}'s fsync'd files, read at {root}:\n{text}"
    return ok


def digest(root: str) -> str:
    r = subprocess.run([*STRESS, "digest", "--dir", root], capture_output=True, text=True,
                       timeout=HANG_GUARD)
    assert r.returncode == 0, f"digest of {root}:\n{r.stdout}{r.stderr}"
    return r.stdout.strip()


def assert_same_tree(c: Cluster, nodes: list[int]) -> str:
    """Every node's digest of the whole tree is the same; that digest. When they
    differ, the entries that differ are shown (each node's records, against the
    first node's)."""
    seen = {n: digest(c.mountpoint(n)) for n in nodes}
    doubled = _two_masters_said(c, nodes)
    if len(set(seen.values())) > 1:
        listed = {n: _records(c.mountpoint(n)) for n in nodes}
        first = listed[nodes[0]]
        shown = []
        for n in nodes[1:]:
            shown += [f"  only on node {nodes[0]}: {r}" for r in sorted(first - listed[n])]
            shown += [f"  only on node {n}: {r}" for r in sorted(listed[n] - first)]
        differing = set().union(*(first ^ listed[n] for n in nodes[1:]))
        raise AssertionError("nodes disagree on the tree:\n" + "\n".join(
            f"  node {n}: {d}" for n, d in seen.items()) + "\n" + "\n".join(shown[:40])
            + "\n" + _lock_states(c, nodes, differing) + "\n" + "\n".join(doubled))
    assert not doubled, "a DLM directory node found two masters of one resource:\n" + (
        "\n".join(doubled))
    return seen[nodes[0]]


def _two_masters_said(c: Cluster, nodes: list[int]) -> list[str]:
    """The lines in which a node's DLM, as a resource's directory node, found two
    members mastering it (recovery step 5: a bug that lets both grant at once)."""
    return [f"node {n}: {line}" for n in nodes for line in node_log(c, n).splitlines()
            if "is mastered by both" in line]


def _lock_states(c: Cluster, nodes: list[int], records: set[str], most: int = 3) -> str:
    """For the topmost paths whose records differ: each node's inode number for the
    path and, asked of each node, the DLM's queues of that inode's lock; what a
    disagreement needs to be told apart (a lock two nodes were granted at once, a
    node caching under a lock the master no longer lists, a kernel cache)."""
    paths = sorted({json.loads(r)["path"] for r in records}, key=lambda p: (p.count("/"), p))
    lines = ["lock states of the differing paths:"]
    for path in paths[:most]:
        inos = {}
        for n in nodes:
            try:
                inos[n] = os.lstat(os.path.join(c.mountpoint(n), path)).st_ino
            except OSError as exc:
                inos[n] = f"lstat: {exc.strerror}"
        lines.append(f"  {path}: inode per node {inos}")
        for ino in sorted({i for i in inos.values() if isinstance(i, int)}):
            for n in nodes:
                try:    # (what it shows must not cost the failure it explains)
                    r = run_cli("locks", "--control", c.control(n), f"inode:{ino}",
                                timeout=15)
                    shown = (r.stdout or r.stderr).strip().replace("\n", "\n      ")
                except subprocess.TimeoutExpired:
                    shown = "(no answer within 15 s)"
                lines.append(f"    inode:{ino} asked of node {n}:\n      {shown}")
    return "\n".join(lines)


def _records(root: str) -> set[str]:
    """Every entry's digest record of the tree (stress digest --list), as a set."""
    r = subprocess.run([*STRESS, "digest", "--dir", root, "--list"], capture_output=True,
                       text=True, timeout=HANG_GUARD)
    return set(r.stdout.splitlines()[:-1])


# ----------------------------------------------------------------------------
# the nodes' logs


def node_log(c: Cluster, node: int) -> str:
    """Node's whole log, every life of it (clusterutil appends across restarts)."""
    path = c.dir / f"node{node}.clusterfs.log"
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def log_size(c: Cluster, node: int) -> int:
    with contextlib.suppress(FileNotFoundError):
        return (c.dir / f"node{node}.clusterfs.log").stat().st_size
    return 0


def replays(text: str) -> list[tuple[int, int]]:
    """(slot, transactions) of every replay that found transactions, in log order."""
    return [(int(m.group(1)), int(m.group(2))) for m in _REPLAYED.finditer(text)]


@dataclass(frozen=True)
class Recovery:
    generation: int
    total: float
    dlm: float
    replay: float


def recoveries(text: str) -> list[Recovery]:
    """Every "journal recovery done" line of a node's log."""
    return [Recovery(int(m.group(1)), float(m.group(2)), float(m.group(3)),
                     float(m.group(4))) for m in _RECOVERED.finditer(text)]


def since(c: Cluster, node: int, offset: int) -> str:
    return node_log(c, node)[offset:] if offset else node_log(c, node)


# ----------------------------------------------------------------------------
# the device, read from outside while no node runs


def journal_transactions(device: str, slots: list[int]) -> dict[int, int]:
    """slot -> committed transactions a replay would find there now. While a node runs
    this is a snapshot: stop it first (`frozen`) for an answer that stays true."""
    from clusterfs.fence.poison_pill import read_superblock
    from clusterfs.journal.log import scan_journal
    from clusterfs.storage import open_block_device

    dev = open_block_device(device, writable=False)
    try:
        # as the nodes read it: through O_DIRECT, never this host's page cache, which
        # may still hold what mkfs wrote there (a journal header marked clean)
        assert dev.bypass_page_cache(), f"{device} refuses O_DIRECT"
        sb = read_superblock(dev)
        return {s: len(scan_journal(dev, sb, s)[1]) for s in slots}
    finally:
        dev.close()


def _all_stopped(pid: int) -> bool:
    """Every thread of `pid` is stopped (or gone): none is inside a syscall any more."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return True
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, IndexError):
            continue
        if state not in ("T", "t", "Z", "X"):
            return False
    return True


FREEZE_WAIT = 1.0        # seconds a freeze waits for every thread to stop


@contextlib.contextmanager
def frozen(pids: list[int]) -> Iterator[bool]:
    """SIGSTOP the processes (ours) and wait until every thread has stopped, so nothing
    of theirs reaches the device meanwhile; SIGCONT at the end (a no-op once killed).
    Yields False if some thread did not stop within FREEZE_WAIT: one blocked in the
    kernel (e.g. a FUSE notification waiting for a directory lock that a client's call,
    itself waiting for this frozen server, holds) stops only once the others go on."""
    try:
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        deadline = time.monotonic() + FREEZE_WAIT
        while not (stopped := all(_all_stopped(p) for p in pids)):
            if time.monotonic() > deadline:
                break
            time.sleep(0.002)
        yield stopped
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


def kill_with_dirty_journals(c: Cluster, nodes: list[int], want: int = 1,
                             also: Callable[[], bool] = lambda: True,
                             first: Callable[[], None] = lambda: None,
                             poll: float = 0.05, least: int = 1) -> dict[int, int]:
    """Kill -9 the nodes at the same moment, at a moment when at least `want` of their
    journals hold committed transactions (`least` at least) and also() holds (each try
    freezes them, reads their journals from outside, and lets them go on if that is not
    so yet). first() runs just before the kill, while they are frozen (to kill their
    programs: a program that outlived its node would see its mount fail). Their dead
    mounts are detached. Returns slot -> transactions that a replay must find."""
    slots = {n: journal_slot(c, n) for n in nodes}
    pids = [c.mounts[n].pid for n in nodes]
    found: dict[int, int] = {}
    tries = 0
    began = time.monotonic()

    def dirty_now() -> bool:
        nonlocal found, tries
        tries += 1
        with frozen(pids) as stopped:
            if not stopped:
                return False            # let them go on, and look again
            found = journal_transactions(c.device, list(slots.values()))
            if sum(1 for t in found.values() if t >= least) < want or not also():
                return False
            first()
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
            return True
    wait_for(f"{want} dirty journal(s) among nodes {nodes}", dirty_now, poll=poll)
    print(f"nodes {nodes} killed after {tries} look(s) at their journals in "
          f"{time.monotonic() - began:.1f} s: transactions per slot {found}")
    for n in nodes:
        c.kill9(n)           # reaps it and detaches its dead mount
    return {s: t for s, t in found.items() if t}


def journal_slot(c: Cluster, node: int) -> int:
    """The journal slot of the node's current (last) life, from its log."""
    found = re.findall(r"\(journal slot (\d+),", node_log(c, node))
    assert found, f"node {node} never said its journal slot:\n{node_log(c, node)[-3000:]}"
    return int(found[-1])


# ----------------------------------------------------------------------------
# a big dirty journal, and catching its replay


def batch_content(i: int) -> bytes:
    """File i's content: small, so it is stuffed in its inode and journaled with it."""
    return f"file {i} ".encode() * (1 + i % 9)


def write_batches(root: str, log: str, files: int, batch: int) -> None:
    """Create `files` small files under root/many, fsyncing every `batch`-th (which
    commits the whole running transaction: docs/journal.md). Logs each fsync'd file as
    `tools/stress` does (so `stress verify` checks it) and {"t": "batch", "upto": i}."""
    many = os.path.join(root, "many")
    os.makedirs(many, exist_ok=True)
    fd_log = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_TRUNC, 0o644)

    def append(rec: dict) -> None:
        os.write(fd_log, (json.dumps(rec, sort_keys=True) + "\n").encode())
        os.fsync(fd_log)
    append({"t": "run", "root": root, "seed": 0, "procs": 1})
    for i in range(files):
        path = os.path.join(many, f"f{i:05d}")
        data = batch_content(i)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, data)
            if (i + 1) % batch == 0:
                os.fsync(fd)
        finally:
            os.close(fd)
        if (i + 1) % batch == 0:
            for d in (many, root):
                dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
                os.fsync(dfd)
                os.close(dfd)
            append({"t": "fsync", "path": f"many/f{i:05d}", "size": len(data),
                    "sha256": hashlib.sha256(data).hexdigest(), "op": i, "proc": 0})
            append({"t": "batch", "upto": i})
    os.close(fd_log)


def check_batches(log: Path, root: str) -> int:
    """Every file up to the last logged batch is there with its content, read at root;
    how many."""
    upto = -1
    for line in log.read_text().splitlines():
        rec = json.loads(line)
        if rec.get("t") == "batch":
            upto = rec["upto"]
    for i in range(upto + 1):
        path = os.path.join(root, "many", f"f{i:05d}")
        with open(path, "rb") as f:
            assert f.read() == batch_content(i), f"{path}: wrong content"
    return upto + 1


def read_bytes(pid: int) -> int:
    """Bytes the process has had read from block devices (/proc/PID/io)."""
    try:
        with open(f"/proc/{pid}/io") as f:
            for line in f:
                if line.startswith("read_bytes:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


MAX_LOOK_GAP = 1.0     # seconds: catch_reader's longest span between two looks


def wait_reads_settled(pids: dict[int, int], quiet: int = 64 << 10, span: float = 0.5,
                       timeout: float = 60.0) -> None:
    """Until no node read `quiet` bytes from the device in `span` seconds: a node just
    mounted reads every slot's orphan blocks and its groups' headers (320 KiB and more
    with five slots of 16 orphan blocks), which catch_reader would take for a replay
    (a CI run under load killed a node that had not begun to replay)."""
    deadline = time.monotonic() + timeout
    before = {n: read_bytes(pid) for n, pid in pids.items()}
    while time.monotonic() < deadline:
        time.sleep(span)
        now = {n: read_bytes(pid) for n, pid in pids.items()}
        if all(now[n] - before[n] < quiet for n in pids):
            return
        before = now
    raise AssertionError(f"nodes {sorted(pids)} still reading after {timeout} s")


class ReaderWatch:
    """catch_reader in a thread, started before what makes a node read (a kill): a
    replay that begins, or even ends, before the test would have started looking is
    still caught. A context manager: leaving it stops the watch (a test that failed
    before asking for the result leaves no thread that could signal a pid later).
    The nodes' own start-up reads are waited out first (wait_reads_settled)."""

    def __init__(self, pids: dict[int, int], threshold: int, sig: int = signal.SIGKILL
                 ) -> None:
        wait_reads_settled(pids)
        self._stop = threading.Event()
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
        self._caught = self._pool.submit(catch_reader, pids, threshold, sig=sig,
                                         stop=self._stop)

    def result(self) -> int:
        """The node caught (waits; the hang guard ends it)."""
        return self._caught.result()

    def __enter__(self) -> ReaderWatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._pool.shutdown()


def catch_reader(pids: dict[int, int], threshold: int, window: float = 0.25,
                 timeout: float = HANG_GUARD, sig: int = signal.SIGKILL,
                 stop: threading.Event | None = None) -> int:
    """The first node (of node -> pid) that reads `threshold` bytes from the device
    within `window` seconds, sent `sig` (SIGKILL; SIGSTOP to freeze it) the moment it
    is seen; its node id. A journal replay reads at tens of MB/s; the nodes' other
    reads (disk heartbeats, the orphan sweeper) come a few blocks at a time. The window
    is wide enough for a loaded machine: there this loop may look only every few tens
    of milliseconds, and the replay read at a few MB/s (with 0.05 s a CI run under load
    saw no node read 256 KiB in a window and waited out the hang guard). A look that
    comes later than `window` after the one before compares with that one (up to
    MAX_LOOK_GAP): a replay done between two looks far apart is still seen (a CI run
    under load missed one so and waited out the hang guard)."""
    seen: dict[int, collections.deque] = {n: collections.deque() for n in pids}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not (stop is not None and stop.is_set()):
        now = time.monotonic()
        for n, pid in pids.items():
            q = seen[n]
            q.append((now, read_bytes(pid)))
            # the left edge: the newest look at least `window` old (none past the cap)
            while len(q) > 1 and (q[1][0] <= now - window or q[0][0] < now - MAX_LOOK_GAP):
                q.popleft()
            if q[-1][1] - q[0][1] >= threshold:
                os.kill(pid, sig)
                return n
        time.sleep(0.001)
    raise AssertionError(f"no node of {sorted(pids)} read {threshold} bytes within "
                         f"{window} s in {timeout} s")


if __name__ == "__main__":      # python3 tests/recoveryutil.py write-batches ROOT LOG N B
    if sys.argv[1:2] == ["write-batches"]:
        write_batches(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
