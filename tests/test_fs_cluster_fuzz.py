"""Random work on one small tree from several tasks on each of two nodes (tier 2):
FileSystems on one image over the real DLM on the in-memory transport, three tasks a
node, each doing random creates, unlinks, renames, links, symlinks, chmods, writes
(up to 6 MiB into a file, so across data chunks and resource groups), truncates,
reads, xattrs and fsyncs on the same few names. Two tasks of one node share the
locks of what they both touch, which the one-task-per-node tests never do.

What must hold: no call fails but with an answer a racing change explains (ENOENT,
EEXIST, ENOTEMPTY, ESTALE for a directory another task removed, ...): never EIO or
an exception of ours; afterwards both nodes see the same tree, byte for byte; after
both unmount, fsck finds the image clean. The merge variant has node 2 freeze as a
lock member dies and node 1 go on alone, then the two merge (as
test_fs_cluster_inproc's partition test). The death variant runs three nodes, each
also fsync'ing files of its own, and one dies while its journal holds committed
blocks not yet home: the survivors replay it, every file it fsync'd is there, and
they go on, agree and leave fsck clean.

Variants besides: a lock cache bounded to 40 locks (its shrinker letting locks go all
the time), and a 16 MiB device that fills (ENOSPC must give back what it reserved).

A node learns a directory's number only by a lookup or a create of its own, as a
kernel does: the design relies on it (a create takes no lock of its own until its
directory's lock goes, docs/locking.md; an ancestor walk reads parent links from
disk). Handing node 1's numbers to node 2 directly withdrew nodes on blocks that were
not inodes yet ("bad magic 0x0": a directory its maker had not written home), a
finding of the harness, not of the filesystem. (Two holders of one inode's lock were
seen then too, and once since with numbers learned by lookups: a DLM bug, found and
fixed with _check_locks.)

Found with it (2026-12-07): a truncate waiting for a group's lock while a write of
the same file on the same node allocated elsewhere freed blocks in a group it did not
hold (EIO, and the blocks leaked: fsck); and, with a watchdog on the partition test's
random work, a conversion deadlock a merge rebuilt that nothing refused (a hang); and
two masters of one inode's lock after a merge's recoveries overtook each other (each
granted its own node; docs/recovery.md), which _check_locks now looks for every 10 ms
of every run: no two nodes holding conflicting locks, no resource with two masters.
The soak (`-m slow`) runs CLUSTERFS_FUZZ_SOAK_SEEDS seeds of each variant.
"""

from __future__ import annotations

import errno
import io
import os
import random
import stat
import traceback
from dataclasses import dataclass, field

import pytest
import trio
from dlmcluster import MemCluster, memory_cluster
from test_fs_cluster_inproc import Node, _formatted, _gated_node_on, _node_on, _tree
from trioutil import trio_test, wait_until

from clusterfs.errors import FSError
from clusterfs.fs.filesystem import FileSystem
from clusterfs.fsck.checker import run_fsck
from clusterfs.fsck.report import Report
from clusterfs.node.placement import Placement

# what a racing change explains (a directory another task removed is ESTALE by number),
# or the call itself (three 3000-byte xattrs do not fit in a block: ENOSPC)
EXPLAINED = {errno.ENOENT, errno.EEXIST, errno.ENOTEMPTY, errno.EISDIR, errno.ENOTDIR,
             errno.EINVAL, errno.ENODATA, errno.EMLINK, errno.ESTALE, errno.ENAMETOOLONG,
             errno.ENOSPC}
NAMES = [b"f%d" % i for i in range(6)] + [b"d%d" % i for i in range(3)] + [b"s0"]
REG = stat.S_IFREG | 0o644
DIR = stat.S_IFDIR | 0o755
WRITE_SIZES = [1, 100, 4096, 5000, 65536, 300000]
TASKS = 3                 # per node
OPS_EACH = 1500           # changes per node, counted (not timed)
HANG_GUARD = 240          # seconds; a run takes 5-15
WATCH_EVERY = 0.01        # seconds between two looks at every node's locks
SOAK_SEEDS = int(os.environ.get("CLUSTERFS_FUZZ_SOAK_SEEDS", "50"))


class Run:
    """The directories each node knows (by a lookup or a create of its own, as a
    kernel learns an inode number), what went wrong, and how much was done."""

    def __init__(self, top: int, nodes: int) -> None:
        self.top = top
        self.dirs: dict[int, list[int]] = {}
        self.bugs: list[str] = []
        self.done = [0] * nodes
        self.write_sizes = WRITE_SIZES

    @classmethod
    async def on_shared_tree(cls, fss: dict[int, FileSystem]) -> Run:
        """Node 1 makes `top` and two directories in it; every node then learns them."""
        maker = fss[1]
        top = (await maker.mknod(maker.root, b"top", DIR, 0, 0, 0)).ino
        for i in range(2):
            await maker.mknod(top, b"sub%d" % i, DIR, 0, 0, 0)
        run = cls(top, len(fss))
        for n, fs in fss.items():
            await run.learn(fs, n)
        return run

    async def learn(self, fs: FileSystem, node: int) -> None:
        """The shared tree's first directories, looked up by `node` as a kernel would
        (an ancestor walk reads the parent links of directories it does not lock:
        their numbers must have come through their parents' locks)."""
        top = await fs.lookup(fs.root, b"top")
        assert top is not None and top.ino == self.top
        subs = [await fs.lookup(self.top, b"sub%d" % i) for i in range(2)]
        self.dirs[node] = [self.top] + [sub.ino for sub in subs if sub is not None]

    def knows(self, node: int, found) -> None:
        """`node` found (or made) a directory: it may work in it from now on."""
        dirs = self.dirs[node]
        if stat.S_ISDIR(found.d.mode) and found.ino not in dirs and len(dirs) < 8:
            dirs.append(found.ino)


async def _namespace_op(fs: FileSystem, run: Run, rng: random.Random, node_id: int,
                        d: int, name: bytes, kind: int) -> None:
    dirs = run.dirs[node_id]
    if kind == 0 and name[:1] == b"s":
        await fs.mknod(d, name, stat.S_IFLNK | 0o777, 0, 0, 0,
                       target=b"t" * rng.choice([5, 300, 5000]))
    elif kind == 0:
        run.knows(node_id, await fs.mknod(d, name, DIR if name[:1] == b"d" else REG,
                                          0, 0, 0))
    elif kind == 1:
        await fs.unlink(d, name, want_dir=name[:1] == b"d")
    elif kind == 2:
        # (flags 1: RENAME_NOREPLACE, 2: RENAME_EXCHANGE)
        await fs.rename(d, name, rng.choice(dirs), rng.choice(NAMES),
                        rng.choice([0, 0, 0, 1, 2]))
    elif rng.random() < 0.2:
        # now and then a look that changes nothing: a listing, a statfs, a readlink
        await rng.choice([lambda: fs.readdir(d), fs.usage,
                          lambda: _readlink_if_any(fs, d, name),
                          lambda: _list_long(fs, d)])()
    else:
        node = await fs.lookup(d, name)
        if node is not None and stat.S_ISREG(node.d.mode):
            await fs.link(node.ino, rng.choice(dirs), rng.choice(NAMES))
        elif node is not None:
            run.knows(node_id, node)


async def _list_long(fs: FileSystem, d: int) -> None:
    """As `ls -l` through a cluster mount: the names, checked again under the
    directory's lock alone, their inodes brought in behind (run_list_ahead), then a
    lookup of each (fuse/operations.py's readdir)."""
    entries = await fs.listing(d)
    still = await fs.still_listed(d, [(name, ino) for name, ino, _t in entries])
    fs.warm_listed([ino for (_n, ino, _t), ok in zip(entries, still, strict=True) if ok])
    for name, _ino, _t in entries:
        await fs.lookup(d, name)


async def _readlink_if_any(fs: FileSystem, d: int, name: bytes) -> None:
    found = await fs.lookup(d, name)
    if found is not None and stat.S_ISLNK(found.d.mode):
        await fs.readlink(found.ino)


async def _file_op(fs: FileSystem, rng: random.Random, ino: int, kind: int,
                   sizes: list[int]) -> None:
    if kind == 4:
        await fs.setattr(ino, mode=rng.randrange(0o1000), uid=rng.choice([0, 7]))
    elif kind in (5, 6):
        await fs.truncate(ino, rng.choice([0, rng.randrange(3 * 4096),
                                           rng.randrange(6 << 20)]))
    elif kind in (7, 8, 9):
        off = rng.choice([rng.randrange(8192), rng.randrange(6 << 20), (4 << 20) - 100])
        size = rng.choice(sizes)
        await fs.write(ino, off, bytes([rng.randrange(256)]) * size)
    elif kind == 10:
        await fs.read(ino, rng.randrange(6 << 20), rng.choice([100, 131072]))
    elif kind == 11:
        await fs.setxattr(ino, b"user.a%d" % rng.randrange(3),
                          b"v" * rng.choice([3, 200, 3000]))
    elif kind == 12:
        await fs.removexattr(ino, b"user.a%d" % rng.randrange(3))
    else:
        await fs.fsync(ino, datasync=rng.random() < 0.5)


async def _open_file_op(fs: FileSystem, rng: random.Random, opened: list[int]) -> None:
    """On a file this task holds open, as through a file descriptor: whatever any node
    did to its names meanwhile (unlinked everywhere, it stays until the last close in
    the cluster), so no ESTALE or ENOENT either; or its close."""
    ino = rng.choice(opened)
    kind = rng.randrange(4)
    if kind == 0:
        opened.remove(ino)
        await fs.release(ino)
    elif kind == 1:
        await fs.write(ino, rng.randrange(1 << 20), b"o" * rng.choice([10, 9000]))
    elif kind == 2:
        await fs.read(ino, 0, 65536)
    else:
        await fs.truncate(ino, rng.randrange(1 << 20))


async def random_op(fs: FileSystem, run: Run, rng: random.Random, node: int,
                    opened: list[int]) -> None:
    """One random call (`opened`: the files this task holds open); an unexplained
    failure goes to run.bugs."""
    d, name, kind = rng.choice(run.dirs[node]), rng.choice(NAMES), rng.randrange(16)
    try:
        if kind == 15 and opened:
            try:
                await _open_file_op(fs, rng, opened)
            except FSError as exc:
                if exc.errno != errno.ENOSPC:
                    run.bugs.append(f"node {node}: on a file open here: {exc!r}")
        elif kind < 4:
            await _namespace_op(fs, run, rng, node, d, name, kind)
        else:
            found = await fs.lookup(d, name)
            if found is None or not stat.S_ISREG(found.d.mode):
                if found is not None:
                    run.knows(node, found)
                return
            if kind == 14 and len(opened) < 4:
                await fs.open(found.ino)
                opened.append(found.ino)
            elif kind < 14:
                await _file_op(fs, rng, found.ino, kind, run.write_sizes)
    except FSError as exc:
        if exc.errno not in EXPLAINED:
            run.bugs.append(f"node {node}: op {kind} on {d}/{name!r}: "
                            f"{errno.errorcode.get(exc.errno)} {exc}")
    except Exception as exc:  # noqa: BLE001 - every other exception is a finding
        run.bugs.append(f"node {node}: op {kind} on {d}/{name!r}: {exc!r}\n"
                        f"{traceback.format_exc()}")


async def _close_all(fs: FileSystem, opened: list[int], run: Run) -> None:
    for ino in opened:
        try:
            await fs.release(ino)
        except FSError as exc:
            run.bugs.append(f"close of {ino}: {exc!r}")
    opened.clear()


async def _nodes(mc: MemCluster, image, sb, nursery: trio.Nursery,
                 gated: bool) -> list[Node]:
    """A FileSystem per journal slot, homed as a cluster mount places it; gated: each
    holds its slot's lock and runs its journal recovery (for the merge variant)."""
    placement = Placement(sb, [1, 2])
    out = []
    for slot in (0, 1):
        home = placement.home_group(slot + 1)
        if gated:
            node, _recovery = await _gated_node_on(mc, image, sb, slot, nursery, home)
        else:
            node = await _node_on(mc, image, sb, slot, nursery, home)
        nursery.start_soon(node.fs.run_list_ahead)
        out.append(node)
    return out


async def fuzz(tmp_path, seed: int, merge: bool, size_mib: int = 256,
               max_cached: int | None = None) -> Run:
    """size_mib: the device (under 64, writes grow to 3 MiB and run out of space: the
    ENOSPC paths); max_cached: each node's lock cache bounded so, its shrinker
    running. The DLM is watched throughout (_watch_locks)."""
    image, sb = _formatted(tmp_path, journals=2, size_mib=size_mib)
    rng = random.Random(seed)
    members = [1, 2, 3] if merge else [1, 2]
    async with memory_cluster(members, dir_hint=Placement(sb, [1, 2]).dir_hint) as mc, \
            trio.open_nursery() as nursery:
        nodes = await _nodes(mc, image, sb, nursery, gated=merge)
        if max_cached is not None:
            for node in nodes:
                node.fs.glocks.max_cached = max_cached
                nursery.start_soon(node.fs.glocks.run_shrinker)
        a, b = (n.fs for n in nodes)
        run = await Run.on_shared_tree({1: a, 2: b})
        if size_mib < 64:        # (writes that fill it)
            run.write_sizes = [*WRITE_SIZES, 1 << 20, 3 << 20]
        nursery.start_soon(_watch_locks, mc, run)
        with trio.fail_after(HANG_GUARD):
            await _work(mc, [a, b], run, rng, merge)
            _check_locks(mc, run)
            if run.bugs:             # (a node may have withdrawn: the finding is enough)
                nursery.cancel_scope.cancel()
                return run
            trees = [await _tree(fs, run.top) for fs in (a, b)]
            if trees[0] != trees[1]:
                run.bugs.append(f"the nodes see different trees:\n{trees[0]}\n{trees[1]}")
            for node in nodes:
                await node.fs.shutdown()
                node.dev.close()
        nursery.cancel_scope.cancel()
    _fsck(image, run)
    return run


async def _random_work(fs: FileSystem, run: Run, node: int, rng: random.Random,
                       stop: trio.Event) -> None:
    """One task's random calls on `node` (counted in run.done) until `stop` or the
    first finding, then the close of what it holds open (a dead node's stay open with
    it: orphans for the survivors to sweep)."""
    opened: list[int] = []
    while not (stop.is_set() or run.bugs):
        await random_op(fs, run, rng, node, opened)
        run.done[node - 1] += 1
        await trio.sleep(rng.random() * 0.002)
    await _close_all(fs, opened, run)


async def _work(mc: MemCluster, fss: list[FileSystem], run: Run, rng: random.Random,
                merge: bool) -> None:
    stop = trio.Event()
    async with trio.open_nursery() as work:
        for n in (0, 1):
            for _ in range(TASKS):
                work.start_soon(_random_work, fss[n], run, n + 1,
                                random.Random(rng.random()), stop)
        await wait_until(lambda: run.bugs or min(run.done) >= OPS_EACH // 2, HANG_GUARD)
        if merge and not run.bugs:
            mc.crash(3, remove=False)                   # node 2 freezes as node 3 dies
            await mc.freeze_and_merge(rng, lone=1, frozen=2, dead=3, held=rng.random() < 0.5)
            await mc.join(3)
            await mc.wait_running(30)
        at = list(run.done)
        await wait_until(lambda: run.bugs or min(run.done[0] - at[0], run.done[1] - at[1])
                         >= OPS_EACH // 2, HANG_GUARD)
        stop.set()


# ----------------------------------------------------------------------------
# a node dies in the middle


@dataclass(eq=False)
class Life:
    """One node's FileSystem and everything it runs, which its death cancels."""
    node: Node
    scope: trio.CancelScope
    nursery: trio.Nursery
    ended: trio.Event
    fsynced: dict[bytes, bytes] = field(default_factory=dict)   # its private files
    private: int = 0


async def _live(mc: MemCluster, image, sb, slot: int, lives: dict[int, Life],
                task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Node slot + 1 as a cluster mount runs it: its journal slot's lock, its journal
    recovery in front of its locks, its orphan sweeper; until cancelled."""
    ended = trio.Event()
    placement = Placement(sb, list(range(1, len(mc.nodes) + 1)))
    try:
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                node, recovery = await _gated_node_on(mc, image, sb, slot, nursery,
                                                      placement.home_group(slot + 1))
                recovery.on_recovered = node.fs.kick_orphans
                nursery.start_soon(node.fs.run_orphan_sweeper)
                nursery.start_soon(node.fs.run_list_ahead)
                lives[slot + 1] = Life(node, scope, nursery, ended)
                task_status.started()
                await trio.sleep_forever()
    finally:
        ended.set()


async def _durable_writer(fs: FileSystem, life: Life, run: Run, rng: random.Random,
                          stop: trio.Event) -> None:
    """New files in the node's own directory, each written and fsync'd, then noted:
    every one noted must be there after the node's death (nothing fsync'd is lost)."""
    i = 0
    while not (stop.is_set() or run.bugs):
        name, data = b"k%d" % i, bytes([rng.randrange(256)]) * rng.choice([10, 5000, 70000])
        i += 1
        try:
            f = await fs.mknod(life.private, name, REG, 0, 0, 0)
            await fs.write(f.ino, 0, data)
            await fs.fsync(f.ino)
        except FSError as exc:
            run.bugs.append(f"durable writer: {name!r}: {exc!r}")
            return
        life.fsynced[name] = data
        await trio.sleep(rng.random() * 0.01)


async def _kill(mc: MemCluster, victim: int, life: Life) -> None:
    """The victim dies at a moment its journal holds committed blocks not yet home:
    its tasks end, what it had queued for the disk goes out (as if sent just before),
    then its DLM node is gone and the others fence it and replay its journal."""
    journal = life.node.fs.txn.journal
    await wait_until(lambda: len(journal.pending_home) > 0, HANG_GUARD, 0.0005)
    life.scope.cancel()
    await life.ended.wait()
    life.node.dev.close()
    mc.crash(victim)


async def _check_fsynced(fs: FileSystem, dead: Life, run: Run, node: int) -> None:
    for name, data in dead.fsynced.items():
        got = await fs.lookup(dead.private, name)
        back = await fs.read(got.ino, 0, len(data) + 1) if got is not None else None
        if back != data:
            run.bugs.append(f"node {node}: the dead node's fsync'd {name!r} "
                            f"{'is missing' if back is None else 'differs'}")


async def crash_fuzz(tmp_path, seed: int, count: int = 3) -> tuple[Run, int]:
    """Random work on `count` nodes (TASKS tasks and a durable writer each); one dies
    (_kill); the survivors go on. (The run, and how many files the dead one fsync'd.)"""
    image, sb = _formatted(tmp_path, journals=count, size_mib=256)
    rng = random.Random(seed)
    ids = list(range(1, count + 1))
    victim = rng.choice(ids)
    lives: dict[int, Life] = {}
    async with memory_cluster(ids, dir_hint=Placement(sb, ids).dir_hint) as mc, \
            trio.open_nursery() as nursery:
        for slot in range(count):
            await nursery.start(_live, mc, image, sb, slot, lives)
        fss = {n: life.node.fs for n, life in lives.items()}
        run = await Run.on_shared_tree(fss)
        for n, life in lives.items():
            life.private = (await fss[n].mknod(fss[n].root, b"own%d" % n, DIR, 0, 0, 0)).ino
        survivors = [n for n in ids if n != victim]
        nursery.start_soon(_watch_locks, mc, run)
        with trio.fail_after(HANG_GUARD):
            await _work_through_a_death(mc, fss, lives, run, rng, victim)
            _check_locks(mc, run)
            if run.bugs:             # (a node may have withdrawn: the finding is enough)
                nursery.cancel_scope.cancel()
                return run, len(lives[victim].fsynced)
            for n in survivors:
                await _check_fsynced(fss[n], lives[victim], run, n)
            trees = [await _tree(fss[n], run.top) for n in survivors]
            if any(t != trees[0] for t in trees):
                run.bugs.append("the survivors see different trees")
            for n in survivors:
                await fss[n].shutdown()
        nursery.cancel_scope.cancel()
    for n in survivors:
        lives[n].node.dev.close()
    _fsck(image, run)
    return run, len(lives[victim].fsynced)


async def _work_through_a_death(mc: MemCluster, fss: dict[int, FileSystem],
                                lives: dict[int, Life], run: Run, rng: random.Random,
                                victim: int) -> None:
    stop = trio.Event()

    running = dict.fromkeys(fss, 0)

    async def task(n: int, trng: random.Random) -> None:
        running[n] += 1
        await _random_work(fss[n], run, n, trng, stop)
        running[n] -= 1

    async def writer(n: int, wrng: random.Random) -> None:
        running[n] += 1
        await _durable_writer(fss[n], lives[n], run, wrng, stop)
        running[n] -= 1

    for n, life in lives.items():
        for _ in range(TASKS):
            life.nursery.start_soon(task, n, random.Random(rng.random()))
        life.nursery.start_soon(writer, n, random.Random(rng.random()))
    await wait_until(lambda: run.bugs or min(run.done) >= OPS_EACH // 2, HANG_GUARD)
    await _kill(mc, victim, lives[victim])
    at = list(run.done)
    await wait_until(lambda: run.bugs or all(run.done[n - 1] - at[n - 1] >= OPS_EACH // 2
                                             for n in fss if n != victim), HANG_GUARD)
    stop.set()
    await wait_until(lambda: all(running[n] == 0 for n in fss if n != victim), HANG_GUARD)


async def _watch_locks(mc: MemCluster, run: Run) -> None:
    """Throughout a run, every WATCH_EVERY: _check_locks. A look at the end alone came
    too late for a resource two nodes mastered for a while: idle, it was freed."""
    while not run.bugs:
        _check_locks(mc, run)
        await trio.sleep(WATCH_EVERY)


def _check_locks(mc: MemCluster, run: Run) -> None:
    """No two nodes hold conflicting locks, and, whenever no recovery is under way, no
    resource has two masters (found so, 2026-12-07: a step 6 lookup that a newer view
    overtook before it ran made its node the master of an inode another node
    mastered; after the merge each granted its own node, EX and PR, and a node
    withdrew on a directory the other was rewriting)."""
    found = mc.conflicting_holds()
    if mc.running_alike():
        found += [f"{key!r} has two masters: {masters}"
                  for key, masters in sorted(mc.several_masters().items())]
    if found:
        run.bugs += [*found[:5], mc.dump()]


def _fsck(image, run: Run) -> None:
    out, err = io.StringIO(), io.StringIO()
    if run_fsck(str(image), Report(out, err, quiet=True)) != 0:
        run.bugs.append(f"fsck:\n{out.getvalue()[-3000:]}{err.getvalue()[-2000:]}")


def _check(run: Run) -> None:
    assert run.bugs == [], "\n".join(run.bugs[:10])


@pytest.mark.parametrize("seed", [3, 9, 14, 16])
@trio_test
async def test_random_work_of_three_tasks_a_node_leaves_one_tree_and_fsck_clean(
        tmp_path, seed) -> None:
    _check(await fuzz(tmp_path, seed, merge=False))


@pytest.mark.parametrize("seed", [1, 2])
@trio_test
async def test_random_work_of_three_tasks_a_node_across_a_merge(tmp_path, seed) -> None:
    _check(await fuzz(tmp_path, seed, merge=True))


@pytest.mark.parametrize("seed", [1, 2])
@trio_test
async def test_random_work_with_a_lock_cache_of_forty_locks(tmp_path, seed) -> None:
    """(`-o max_glocks`) Each node's shrinker lets locks go all the time, under the
    work and (seed 1) across the merge."""
    _check(await fuzz(tmp_path, seed, merge=seed % 2 == 1, max_cached=40))


@trio_test
async def test_random_work_on_a_device_that_fills(tmp_path) -> None:
    """16 MiB, and writes of up to 3 MiB: some run out of room (ENOSPC, a few a run)
    and must give back what they took (fsck finds no leak)."""
    _check(await fuzz(tmp_path, 4, merge=False, size_mib=16))


@pytest.mark.parametrize("seed", [1, 5, 7])
@trio_test
async def test_random_work_on_three_nodes_one_of_which_dies(tmp_path, seed) -> None:
    """Victim node 1, 3 and 2 by seed: it dies with committed blocks in its journal;
    every file it fsync'd is back on both survivors, which go on and agree."""
    run, fsynced = await crash_fuzz(tmp_path, seed)
    _check(run)
    assert fsynced > 0


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(2000, 2000 + SOAK_SEEDS))
@trio_test
async def test_soak_random_work_on_three_nodes_one_of_which_dies(tmp_path, seed) -> None:
    _check((await crash_fuzz(tmp_path, seed))[0])


@pytest.mark.slow
@pytest.mark.parametrize("merge", [False, True])
@pytest.mark.parametrize("seed", range(1000, 1000 + SOAK_SEEDS))
@trio_test
async def test_soak_random_work_of_three_tasks_a_node(tmp_path, seed, merge) -> None:
    _check(await fuzz(tmp_path, seed, merge))


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(3000, 3000 + SOAK_SEEDS))
@trio_test
async def test_soak_random_work_with_a_small_lock_cache(tmp_path, seed) -> None:
    _check(await fuzz(tmp_path, seed, merge=seed % 2 == 1, max_cached=40))
