"""Nodes die under load and the rest go on (tier 4; issue 7 items 6, 2 and 7).

Three (or five) `clusterfs mount --config` processes on one loop device; `tools/stress`
runs on every node at once (below, which directories); nodes are killed
with SIGKILL in the middle, at a moment their journals hold committed transactions
(recoveryutil.kill_with_dirty_journals freezes them, reads their journals from outside
and kills only then), so every replay is checked against a known transaction count.
What must hold afterwards:

* the survivors' stress runs end with no failure (their calls waited through the
  recovery; none failed), and they go on working after the dead node rejoined;
* each survivor logged its journal recovery, with its time;
* each dead node's dirty journal was replayed by exactly one node, all of it;
* every file a dead node had fsync'd is intact, read through a survivor and through
  the dead node itself once restarted; the restarted node works (a new stress run);
* every node sees the same tree (stress digest);
* after a clean unmount of every node, fsck is clean (clusterutil.cluster checks): no
  orphan inode either (a file the dead node had open, or had just unlinked, is freed by
  a survivor's orphan sweep after the replay).

Each node works in its own private directory and, in two of the three default seeds,
also in one shared directory where the nodes race on the same names (every node, the
victim included; or the survivors only). The soak (`-m slow`,
test_soak_node_killed_under_stress) runs many seeds in the three variants: private
only, the survivors also in the shared directory, every node in it.

Nothing here waits a fixed time: each step waits for an event (a number of fsync
records, a log line, a process's end) under a hang guard of recoveryutil.HANG_GUARD.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import mountutil
import pytest
from clusterutil import Cluster, cluster, node_status
from recoveryutil import (
    HANG_GUARD,
    ReaderWatch,
    StressRun,
    assert_same_tree,
    check_batches,
    kill_all,
    kill_with_dirty_journals,
    log_size,
    recoveries,
    replays,
    since,
    stop_all,
    verify,
    verify_intact,
    wait_for,
)

pytestmark = pytest.mark.skipif(mountutil.missing_prerequisites() is not None,
                                reason=str(mountutil.missing_prerequisites()))

# (seed, who also races in the shared directory); the victim is node 1 + seed % 3
SEEDS = [(101, "all"), (202, "survivors"), (303, "none")]
SOAK_SEEDS = int(os.environ.get("CLUSTERFS_SOAK_SEEDS", "20"))
SOAK_FROM = int(os.environ.get("CLUSTERFS_SOAK_FROM", "5000"))     # the first soak seed
MIN_FSYNCS = 8          # fsync records each stress run has logged before a death
MIN_CLEAN = 3           # files a victim's stress fsync'd and left unchanged when it dies
MORE_FSYNCS = 3         # and each survivor's, after the victim rejoined
DEVICE = 1 << 30


def start_stress(c: Cluster, tmp_path, seed: int, victims: set[int],
                 shared: str) -> dict[int, StressRun]:
    """A stress run per node in its own private directory, and in the shared one too
    for `shared` = "survivors" (all but the victims) or "all"."""
    def in_shared(n: int) -> bool:
        return shared == "all" or (shared == "survivors" and n not in victims)
    return {n: StressRun(n, c.mountpoint(n), seed + 10 * n, tmp_path,
                         shared="shared" if in_shared(n) else None).start()
            for n in c.node_ids}


def wait_fsyncs(runs: list[StressRun], count: int) -> None:
    """Until each run has logged `count` fsync records (more than it has now)."""
    want = {r.node: r.fsyncs() + count for r in runs}
    wait_for(f"{count} more fsync records from nodes {sorted(want)}",
             lambda: all(r.fsyncs() >= want[r.node] or not r.running() for r in runs))
    for r in runs:
        assert r.running(), f"stress on node {r.node} ended early:\n{r.output()[-4000:]}"


def kill_nodes(c: Cluster, nodes: list[int], runs: dict[int, StressRun]) -> dict[int, int]:
    """Node death, at a moment a journal of theirs holds transactions and their stress
    runs have fsync'd files to check: their programs and mount processes SIGKILLed
    (dead mounts detached). Returns slot -> transactions their replay must find."""
    return kill_with_dirty_journals(
        c, nodes, also=lambda: all(runs[n].clean_fsynced() >= MIN_CLEAN for n in nodes),
        first=lambda: kill_all([runs[n] for n in nodes]))


def assert_replayed_once(c: Cluster, dirty: dict[int, int], offsets: dict[int, int]) -> None:
    """Each dirty journal was replayed by exactly one node, with all its transactions."""
    for slot, txns in dirty.items():
        done = replays_of(c, slot, offsets)
        assert len(done) == 1 and done[0][1] == txns, (
            f"journal {slot} held {txns} transactions; replays (node, transactions): {done}")


def wait_recovered(c: Cluster, nodes: list[int], offsets: dict[int, int],
                   departed: set[int], timeout: float = HANG_GUARD) -> dict[int, list]:
    """Until every node in `nodes` logged a journal recovery done after `offsets`
    (covering `departed`, possibly over several views); its recoveries per node."""
    def done(n: int) -> bool:
        text = since(c, n, offsets[n])
        gone = {int(x) for m in re.findall(r"journal recovery for departed \[([\d, ]+)\]",
                                           text) for x in m.split(",")}
        return bool(recoveries(text)) and departed <= gone and _last_is_done(text)
    wait_for(f"journal recovery on nodes {nodes} for {sorted(departed)}",
             lambda: all(done(n) for n in nodes), timeout)
    return {n: recoveries(since(c, n, offsets[n])) for n in nodes}


def _last_is_done(text: str) -> bool:
    """The last recovery this log started has finished."""
    started = text.rfind("journal recovery for departed")
    return started >= 0 and text.find("journal recovery done", started) >= 0


def report_recovery(found: dict[int, list]) -> None:
    for n, recs in found.items():
        for r in recs:
            print(f"node {n}: gen {r.generation} journal recovery {r.total:.3f} s "
                  f"(DLM {r.dlm:.3f} s, replay {r.replay:.3f} s)")


def replays_of(c: Cluster, slot: int, offsets: dict[int, int]) -> list[tuple[int, int]]:
    """(node, transactions) of every replay of `slot` logged after `offsets`."""
    return [(n, t) for n, off in offsets.items()
            for s, t in replays(since(c, n, off)) if s == slot]


# ----------------------------------------------------------------------------
# one node killed under stress (item 6)


def node_death_under_stress(tmp_path, seed: int, shared: str = "none") -> None:
    with cluster(tmp_path, nodes=3, size=DEVICE) as c:
        victim = 1 + seed % 3
        survivors = [n for n in c.node_ids if n != victim]
        runs = start_stress(c, tmp_path, seed, {victim}, shared)
        try:
            one_death(c, tmp_path, seed, victim, survivors, runs, shared != "none")
        finally:
            stop_all(list(runs.values()))
            kill_all(list(runs.values()))


def one_death(c: Cluster, tmp_path, seed: int, victim: int, survivors: list[int],
              runs: dict[int, StressRun], shared: bool,
              after_recovery: Callable[[], None] = lambda: None,
              after_rejoin: Callable[[], None] = lambda: None) -> None:
    """The victim killed under its stress run, the survivors recover and go on, it
    rejoins (module doc); after_recovery and after_rejoin check more at those points
    (tests/test_proxy_stress.py, tests/test_iscsi_stress.py)."""
    wait_fsyncs(list(runs.values()), MIN_FSYNCS)
    offsets = {n: log_size(c, n) for n in survivors}
    dirty = kill_nodes(c, [victim], runs)

    found = wait_recovered(c, survivors, offsets, {victim})
    report_recovery(found)
    assert_replayed_once(c, dirty, offsets)
    after_recovery()
    # what the dead node fsync'd, read by a survivor
    checked = verify_intact(runs[victim], c.mountpoint(survivors[0]))
    assert checked > 0, "the victim's stress logged no fsync'd file still clean"

    c.start(victim)                                        # it rejoins
    after_rejoin()
    assert verify_intact(runs[victim], c.mountpoint(victim)) == checked
    again = StressRun(victim, c.mountpoint(victim), seed + 1000, tmp_path,
                      private=f"n{victim}-again", shared="shared" if shared else None,
                      ops=150, procs=1).start()
    wait_fsyncs([runs[n] for n in survivors], MORE_FSYNCS)  # the others still going
    again.finish()
    stop_all(list(runs.values()))
    for n in survivors:
        runs[n].finish()
        verify_intact(runs[n], c.mountpoint(victim))
    verify_intact(again, c.mountpoint(survivors[0]))
    assert_same_tree(c, c.node_ids)


@pytest.mark.parametrize(("seed", "shared"), SEEDS)
def test_node_killed_under_stress(tmp_path, seed, shared):
    node_death_under_stress(tmp_path, seed, shared)


@pytest.mark.slow
@pytest.mark.parametrize("shared", ["none", "survivors", "all"])
@pytest.mark.parametrize("seed", range(SOAK_FROM, SOAK_FROM + SOAK_SEEDS))
def test_soak_node_killed_under_stress(tmp_path, seed, shared):
    """Many seeds; each node in its own directory, with the survivors, or every node,
    also racing in one shared directory."""
    node_death_under_stress(tmp_path, seed, shared)


# ----------------------------------------------------------------------------
# several deaths (item 2)


def test_two_of_five_killed_at_once(tmp_path):
    """Two nodes die in the same instant, both with committed transactions in their
    journals: both journals are replayed exactly once, nothing they fsync'd is lost,
    and both come back."""
    with cluster(tmp_path, nodes=5, size=DEVICE) as c:
        victims, survivors = [2, 4], [1, 3, 5]
        runs = {n: StressRun(n, c.mountpoint(n), 700 + 10 * n, tmp_path, procs=1,
                             shared=None).start() for n in c.node_ids}
        try:
            wait_fsyncs(list(runs.values()), MIN_FSYNCS)
            offsets = {n: log_size(c, n) for n in survivors}
            dirty = kill_with_dirty_journals(
                c, victims, want=2, poll=0.01,
                also=lambda: all(runs[n].clean_fsynced() >= 1 for n in victims),
                first=lambda: kill_all([runs[n] for n in victims]))
            report_recovery(wait_recovered(c, survivors, offsets, set(victims)))
            assert_replayed_once(c, dirty, offsets)
            for n in victims:
                assert verify_intact(runs[n], c.mountpoint(survivors[0])) > 0
            c.start(*victims)
            for n in victims:
                verify_intact(runs[n], c.mountpoint(n))
            wait_fsyncs([runs[n] for n in survivors], MORE_FSYNCS)
            stop_all(list(runs.values()))
            for n in survivors:
                runs[n].finish()
                verify_intact(runs[n], c.mountpoint(victims[0]))
            assert_same_tree(c, c.node_ids)
        finally:
            stop_all(list(runs.values()))
            kill_all(list(runs.values()))


BIG_JOURNAL_MIB = 64            # so that the big batch fits without a checkpoint
BIG_FILES, BIG_BATCH = 2000, 8  # up to 250 transactions, ~10 blocks each
BIG_DIRTY = 80                  # transactions node 1's journal holds when it dies
REPLAYING = 256 << 10           # bytes read from the device that mean "replaying"


def _kill_node1_writing_batches(c: Cluster, log: Path) -> dict[int, int]:
    """Node 1 creates small files fsync'd in batches (logged in `log`) and is killed once
    its journal holds at least BIG_DIRTY transactions; its dirty journals, by slot."""
    writer = subprocess.Popen(
        [sys.executable, str(Path(__file__).parent / "recoveryutil.py"), "write-batches",
         c.path(1, "n1"), str(log), str(BIG_FILES), str(BIG_BATCH)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, start_new_session=True)
    try:
        return kill_with_dirty_journals(c, [1], least=BIG_DIRTY, poll=0.5,
                                        also=lambda: writer.poll() is None,
                                        first=lambda: writer.kill())
    finally:
        writer.kill()
        writer.wait()


def test_node_killed_while_replaying_a_dead_nodes_journal(tmp_path):
    """Node 1 dies, while it creates small files fsync'd in batches, with at least 80
    transactions in its journal; the survivor that starts replaying them (the first to
    read 256 KiB from the device: nothing else reads it then) is killed in the middle.
    The other three replay both journals, node 1's in full (an interrupted replay
    leaves the journal's tail where it was; replay is idempotent), and nothing fsync'd
    is lost."""
    with cluster(tmp_path, nodes=5, size=2 << 30, mkfs_args=("-J", str(BIG_JOURNAL_MIB))) as c:
        log = tmp_path / "batches.log"
        others = [2, 3, 4, 5]
        offsets = {n: log_size(c, n) for n in others}
        pids = {n: c.mounts[n].pid for n in others}
        with ReaderWatch(pids, REPLAYING) as watch:
            dirty = _kill_node1_writing_batches(c, log)
            replayer = watch.result()
        c.kill9(replayer)
        text = since(c, replayer, offsets[replayer])
        assert "journal recovery for departed [1]" in text, text
        assert "journal recovery done" not in text and not replays(text), (
            f"node {replayer} finished its replay before it was killed:\n{text}")
        print(f"node {replayer} killed while replaying node 1's journal")

        rest = [n for n in others if n != replayer]
        report_recovery(wait_recovered(c, rest, offsets, {1, replayer}))
        assert_replayed_once(c, dirty, {n: offsets[n] for n in rest})
        ok, _dirty, failed, said = verify(log, c.path(rest[0], "n1"))
        assert ok > 0 and failed == 0, said
        written = check_batches(log, c.path(rest[0], "n1"))
        c.start(1, replayer)
        assert check_batches(log, c.path(1, "n1")) == written
        # the two that died and one that recovered them (a digest of another node's
        # many small files is slow: a lock handover per file)
        assert_same_tree(c, [1, replayer, rest[0]])


def test_the_quorum_returns_while_a_survivor_replays(tmp_path):
    """Node 1 of three dies with at least 80 transactions in its journal; the survivor
    that replays them is frozen (SIGSTOP) in the middle of the replay, long enough for
    the other one to go on alone, without quorum, and begin its recovery again (for
    the frozen one too). The replayer wakes, finishes its replay, and the two merge:
    both finish their recovery, the lone one's begun without quorum too; node 1's
    journal is replayed once, in full; nothing fsync'd is lost; node 1 rejoins. This is
    the split a long replay used to make (docs/recovery.md): the lone survivor's
    recovery then never ended when the replayer's unlocks were lost on it."""
    with cluster(tmp_path, nodes=3, size=2 << 30,
                 mkfs_args=("-J", str(BIG_JOURNAL_MIB))) as c:
        log = tmp_path / "batches.log"
        offsets = {n: log_size(c, n) for n in (2, 3)}
        pids = {n: c.mounts[n].pid for n in (2, 3)}
        with ReaderWatch(pids, REPLAYING, sig=signal.SIGSTOP) as watch:
            dirty = _kill_node1_writing_batches(c, log)
            replayer = watch.result()
        other = 5 - replayer
        try:
            wait_for(f"node {other}, alone, to begin recovering node {replayer}",
                     lambda: f"journal recovery for departed [{replayer}]"
                     in since(c, other, offsets[other]))
            assert "quorum      NO" in node_status(c, other)
            assert not replays(since(c, replayer, offsets[replayer])), (
                f"node {replayer} finished its replay before it was frozen")
        finally:
            os.kill(pids[replayer], signal.SIGCONT)
        print(f"node {replayer} frozen while replaying node 1's journal, node {other} "
              f"alone without quorum meanwhile")
        report_recovery(wait_recovered(c, [2, 3], offsets, {1}))
        assert_replayed_once(c, dirty, offsets)
        written = check_batches(log, c.path(other, "n1"))
        ok, _dirty, failed, said = verify(log, c.path(replayer, "n1"))
        assert ok > 0 and failed == 0, said
        c.start(1)
        assert check_batches(log, c.path(1, "n1")) == written


# ----------------------------------------------------------------------------
# the whole cluster crashes (item 7)


def test_whole_cluster_killed_then_two_mount_at_once(tmp_path):
    """Every node is killed in the same instant, at least two of them with committed
    transactions in their journals; two nodes then mount at the same moment. Exactly
    one of them is the first mounter, every dirty journal is replayed exactly once (by
    it, under the journal locks), the third node replays nothing when it comes back,
    nothing fsync'd is lost and fsck is clean."""
    with cluster(tmp_path, nodes=3, size=DEVICE) as c:
        runs = {n: StressRun(n, c.mountpoint(n), 900 + 10 * n, tmp_path, shared=None
                             ).start() for n in c.node_ids}
        try:
            wait_fsyncs(list(runs.values()), MIN_FSYNCS)
            dirty = kill_with_dirty_journals(
                c, c.node_ids, want=2, poll=0.01,
                also=lambda: sum(r.clean_fsynced() >= 1 for r in runs.values()) >= 2,
                first=lambda: kill_all(list(runs.values())))
        finally:
            kill_all(list(runs.values()))
        offsets = {n: log_size(c, n) for n in c.node_ids}
        c.start(1, 2)                       # both at once
        firsts = [n for n in (1, 2) if "first node to mount" in since(c, n, offsets[n])]
        assert len(firsts) == 1, f"first mounters: {firsts}"
        assert_replayed_once(c, dirty, offsets)
        c.start(3)
        assert not replays(since(c, 3, offsets[3])), "node 3 replayed a journal again"
        assert_replayed_once(c, dirty, offsets)
        checked = sum(verify_intact(runs[n], c.mountpoint(1 + n % 3)) for n in c.node_ids)
        assert checked > 0
        assert_same_tree(c, c.node_ids)


# ----------------------------------------------------------------------------
# a known failure, kept as a reproducer (slow)

LONG_FILES, LONG_BATCH = 25000, 25     # 1 000 transactions, about 42 000 blocks


@pytest.mark.slow
def test_long_replay_keeps_the_survivors_together(tmp_path):
    """Node 1 of three dies with ~42 000 blocks in its journal (4.4 s of replay here).
    The survivor that replays must stay a member throughout, both survivors must finish
    their journal recovery, and node 1 must be able to mount again."""
    with cluster(tmp_path, nodes=3, size=4 << 30, mkfs_args=("-J", "512")) as c:
        log = tmp_path / "batches.log"
        r = subprocess.run([sys.executable, str(Path(__file__).parent / "recoveryutil.py"),
                            "write-batches", c.path(1, "n1"), str(log), str(LONG_FILES),
                            str(LONG_BATCH)], capture_output=True, text=True, timeout=1200)
        assert r.returncode == 0, r.stdout + r.stderr
        offsets = {n: log_size(c, n) for n in (2, 3)}
        kill_with_dirty_journals(c, [1])
        wait_recovered(c, [2, 3], offsets, {1}, timeout=120)
        for n in (2, 3):
            views = re.findall(r"installed view: members \[([\d, ]*)\]", since(c, n, offsets[n]))
            assert all({"2", "3"} <= set(v.split(", ")) for v in views), (
                f"node {n} saw the survivors split: views {views}")
        c.start(1)
        assert check_batches(log, c.path(1, "n1")) == LONG_FILES
