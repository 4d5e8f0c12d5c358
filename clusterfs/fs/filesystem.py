"""FileSystem: namespace and file operations on one mounted clusterfs.

Each public operation is `async`: it takes the glocks it needs (inodes first,
sorted; then resource groups, sorted) and then runs a synchronous body, so
bodies never interleave on this node. Allocation happens before any change in a
body (`_reserve`), so ENOSPC leaves nothing half done. Inode numbers here are
block addresses (the FUSE adapter maps the root to 1).

This module has the state, the plumbing every operation uses (`_hold`, `_inode`,
allocation), attributes and lookups, orphans and the whole-filesystem calls; the
operations themselves are mixins by noun: fs/namespace.py (names), fs/openfiles.py
(open and close, iopen), fs/filedata.py (read, write, truncate, fsync),
fs/xattrs.py and fs/demotion.py (what a lock going down does).
"""

from __future__ import annotations

import bisect
import errno
import itertools
import logging
import stat
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import trio

from clusterfs.cache.blocks import Blocks
from clusterfs.cache.glock import Glock, GlockManager
from clusterfs.cache.inodes import InodeCache
from clusterfs.cache.transaction import TransactionManager
from clusterfs.dlm.interface import Lock, Mode
from clusterfs.errors import ClusterFSError, FormatError, FSError, StorageError, WouldBlock
from clusterfs.format.block import BLOCK_SIZE
from clusterfs.format.directory import NAME_MAX
from clusterfs.format.inode import (
    Inode,
    decode_inode,
)
from clusterfs.format.rgrp import bitmap_blocks_for
from clusterfs.format.superblock import Superblock
from clusterfs.fs.alloc import Allocator, ResourceGroup, decode_free_lvb
from clusterfs.fs.demotion import Demotion
from clusterfs.fs.filedata import FileData
from clusterfs.fs.inode import CachedInode
from clusterfs.fs.kernelforget import KernelForget
from clusterfs.fs.namespace import UNGUARDED_MAX, Namespace
from clusterfs.fs.openfiles import OpenFiles
from clusterfs.fs.orphans import OrphanList
from clusterfs.fs.xattrs import Xattrs

log = logging.getLogger(__name__)
BIG = 1 << 62
PREFETCH_SPAN = 64       # blocks read at once when prefetching inodes
# A scan (stat of every file of a directory, one by one: ls -l without readdirplus,
# find, rsync, make) in a cluster: once SCAN_AFTER lookups in one directory, each less
# than SCAN_WINDOW after the one before, had to lock and read their inode, a lookup
# brings in the next SCAN_BATCH of the directory's inodes by number (made together,
# they lie together) with their locks, many requests in flight at once, instead of one
# round trip and one read each; while the scan goes on, its next miss brings the next.
SCAN_AFTER = 4
SCAN_WINDOW = 0.5
SCAN_BATCH = 128
# listing replies whose inodes wait to be brought in (warm_listed), at most
LIST_AHEAD_BATCHES = 64
SCAN_LEAVES_MAX = 256    # a hashed directory with more leaves is not scanned ahead
# In a cluster a file's data is locked by byte range, in chunks of this many bytes
# (("data", ino, chunk) glocks: docs/locking.md): an overwrite in place holds the
# inode in PR and its chunks in EX, so nodes writing disjoint parts of one file
# run at once; a reader holds its chunks in PR.
DATA_LOCK_BYTES = 4 << 20
UNMOUNT_FREE_TIMEOUT = 20   # seconds an unmount waits for the locks to free unlinked inodes
ORPHAN_SWEEP_INTERVAL = 30  # seconds between looks at orphan lists (sooner after a recovery)
SWEEP_BATCH = 128        # orphan inodes a sweep brings in at once (sweep_orphans)


class _Hold:
    """The async context of one operation body (see FileSystem._hold). A plain class
    rather than a generator: it runs for every request."""

    __slots__ = ("fs", "ex", "pr", "alloc", "frees", "write", "data", "names", "edges",
                 "taken")

    def __init__(self, fs: FileSystem, ex, pr, alloc, frees, write: bool, data,
                 names, edges) -> None:
        self.fs, self.ex, self.pr, self.alloc, self.frees, self.write, self.data = \
            fs, ex, pr, alloc, frees, write, data
        self.names = names
        self.edges = edges
        self.taken: list = []

    async def __aenter__(self) -> None:
        fs = self.fs
        if self.write:
            fs.txn.check_writable()
        ex, pr = self.ex, self.pr
        if fs._unguarded_in and any(i in fs._unguarded_in for i in pr):
            # the first lock of its own an inode made here takes is EX, whatever the
            # operation needs: this node has its only copy (in its journal or cache),
            # and another node's PR must wait for the demote that writes it home
            ex = sorted({*ex, *(i for i in pr if i in fs._unguarded_in)})
            pr = [i for i in pr if i not in fs._unguarded_in]
        wanted = [(("inode", i), Mode.EX) for i in ex]
        wanted += [(("inode", i), Mode.PR) for i in pr]
        wanted += self.data             # ("data", ino, chunk): sorted before the inodes
        self.taken = await fs.glocks.acquire(wanted)
        try:
            if fs._unguarded_in:
                await fs._guard(ex, pr)
            # inodes not cached are read now, with the event loop free, rather than by
            # the body's _inode() on it (their locks are held: a read is safe now)
            missing = [i for i in (*ex, *pr) if i not in fs.inodes]
            if missing:
                await fs.load_missing(missing)
            if self.names:
                await fs.load_leaves(self.names)   # the same for directory leaves
            # and the data blocks a write fills only in part (or a truncate cuts)
            edges = await fs.read_edges_ahead(*self.edges) if self.edges else {}
            groups: set[int] = set()
            if self.alloc is not None:
                groups.update(fs.alloc.groups_for(*self.alloc))
            groups |= self._freed_groups()
            while groups:
                held = await fs.glocks.acquire([(("rgrp", g), Mode.EX) for g in groups])
                self.taken += held
                ahead = await fs.read_groups_ahead(held)
                # Another operation of ours on the same inodes (they share its lock)
                # may have run while we waited, and put blocks to free in another
                # group: take all of them again, in order (no wait while holding some)
                more = self._freed_groups() - groups
                if not more:
                    for glock in held:
                        fs._group(glock, ahead)
                    break
                fs.glocks.release(held)
                self.taken = self.taken[:-len(held)]
                groups |= more
            # (no await from here to the body: these are the running body's alone)
            fs.alloc.usable = groups
            fs.edges_ahead = edges
        except BaseException:
            fs.glocks.release(self.taken)
            raise

    def _freed_groups(self) -> set[int]:
        """The groups of the blocks the body may free, as the inodes are now."""
        if self.frees is None:
            return set()
        return {self.fs.alloc.group_of(b) for b in self.frees()}

    async def __aexit__(self, exc_type, exc, tb) -> None:
        self.fs.alloc.usable = set()
        self.fs.edges_ahead = {}
        self.fs.glocks.release(self.taken)
        if exc_type is not None and issubclass(exc_type, FormatError):
            # a block read during the body (a directory leaf is read when first
            # needed) did not decode: corruption, as at an inode's load
            self.fs.txn.withdraw(str(exc))
        if self.write and exc_type is None:
            await self.fs.txn.end_operation()


@dataclass
class Usage:
    blocks: int
    free: int
    quarantined: int


class FileSystem(Namespace, OpenFiles, FileData, Xattrs, Demotion):
    data_lock_blocks = DATA_LOCK_BYTES // BLOCK_SIZE   # file blocks per data lock

    def __init__(self, blocks: Blocks, sb: Superblock, glocks: GlockManager,
                 txn: TransactionManager, clustered: bool = False,
                 home_group: int | None = None) -> None:
        self.blocks = blocks              # every block read or written goes through it
        self.slot = blocks.slot
        self.sb = sb
        self.glocks = glocks
        self.txn = txn
        self.root = sb.root_ino
        self.alloc = Allocator(sb)
        # every inode object this node keeps, each under its lock (cache/inodes.py)
        self.inodes: InodeCache[CachedInode] = InodeCache(txn)
        self.nlookup: dict[int, int] = {}
        # directory -> (lookups that had to read, time of the last): _scan_ahead
        self._scan_misses: dict[int, tuple[int, float]] = {}
        # inodes listings named, for run_list_ahead, and the batch each waits in
        self._listed: deque[tuple[list[int], trio.Event]] = deque()
        self._listed_pending: dict[int, trio.Event] = {}
        self._listed_kick = trio.Event()
        self._listing_ahead = False              # run_list_ahead is running
        # the generation the kernel was given with each number it holds: in a cluster
        # the block may hold a newer inode by the time the kernel uses the number again
        self.handed: dict[int, int] = {}
        self.opens: dict[int, int] = {}
        self.unlinked: set[int] = set()   # nlink went to 0 here; freed once unused
        self.iopen: dict[int, Lock] = {}  # ("iopen", ino) PR held while open here
        self._iopen_pending: dict[int, trio.Event] = {}
        # inodes freed here -> their generation: until the block holds an inode of
        # another generation, a name that reaches it is stale, and until the freeing
        # transaction is home the disk still shows the old inode (forget does not end
        # that, so entries stay until the block is reused)
        self.freed: dict[int, int] = {}
        # the running body's data blocks read ahead by its hold: pblk -> (inode object,
        # its data_version when the read began, the bytes); edge_copy() says whether
        # one is still the newest
        self.edges_ahead: dict[int, tuple[CachedInode, int, bytes]] = {}
        # cluster: directory -> inodes created in it whose own lock this node has not
        # taken (a create takes none: no other node can reach a new inode before the
        # directory's lock goes, docs/locking.md "Creates take no lock of their own").
        # The directory's lock covers them: its demote writes them home too
        # (_covered_by) and drops them; the first operation that takes one's own lock
        # takes it out of here (_guard). And each such inode -> its directory.
        self._unguarded: dict[int, set[int]] = {}
        self._unguarded_in: dict[int, int] = {}
        self.unguarded_max = UNGUARDED_MAX        # (tests set it lower)
        # new inodes opened by their create while unguarded: their ("iopen", ino) PR is
        # owed, taken before any other node can reach them (_settle_iopen)
        self._iopen_owed: set[int] = set()
        self.clustered = clustered
        # where this node allocates new inodes in a cluster: its own part of the disk
        # (a cluster mount says where: node/placement.py; else by journal slot), so
        # nodes creating at once rarely want the same group
        self.home_group = home_group if home_group is not None else \
            self.slot * sb.rgrp_count // sb.journal_count
        # tell the kernel to forget an inode's attributes (its hook set by the FUSE
        # layer; called from a worker thread, for many inodes at a time)
        self.kernel_forget = KernelForget()
        # take back the names the kernel was given in a directory (set by the FUSE
        # layer; never blocks: the kernel is told later, see fuse/names.py)
        self.names_hook: Callable[[int], None] | None = None
        # this node's orphan list: read by load(), before the mount serves
        self.orphans = OrphanList([], [])
        self._orphan_kick = trio.Event()
        # a departed slot still lists inodes ours had no room for when we adopted it:
        # the sweeper looks again as soon as an entry of ours goes (_orphan_room)
        self._orphans_left_behind = False
        self._sweeping = trio.Lock()     # held by the sweeper while it works
        self.closing = False
        if clustered:
            # withdrawn, a node keeps every lock (nothing it hands over may be stale)
            # and its demotes never end: no operation may wait for a lock any more
            txn.on_withdraw.append(lambda reason: glocks.fail(
                FSError(errno.EIO, f"filesystem withdrawn: {reason}")))
        txn.quarantine_mark = self.alloc.quarantine_mark
        txn.end_quarantine = self.alloc.end_quarantine
        glocks.on_demote("inode", self._demote_inode)
        glocks.on_demote("rgrp", self._demote_rgrp)
        glocks.on_demote("rename", self._demote_flush)
        glocks.on_demote("data", self._demote_data)
        glocks.ranged("data", DATA_LOCK_BYTES)
        # what the lock cache may let go when it is full: an inode's or a chunk's lock
        # goes with what it covers, as if another node had asked for it
        glocks.shrinkable.update(("inode", "data"))
        glocks.can_let_go = self._nothing_to_flush
        glocks.make_room = self._flush_for_demote
        self.inodes.attach(glocks)        # a fresh grant drops a clean copy
        glocks.on_grant("rgrp", self._granted_rgrp)

    async def load(self) -> None:
        """What a mount reads before it serves, with the event loop free (membership and
        the DLM run on it meanwhile; on a slow disk or through a proxy a thousand
        groups' headers take a while): this node's orphan list, and every group's free
        count hint."""
        self.orphans = await self._read_orphans(self.slot)
        await self._read_group_hints()

    def when_withdrawn(self, hook: Callable[[str], None]) -> None:
        """Call `hook(reason)` once, when this node withdraws (the layer above drops
        what the kernel caches)."""
        self.txn.on_withdraw.append(hook)

    # ================================================================ plumbing
    def _corrupt(self, exc: Exception) -> FSError:
        self.txn.withdraw(str(exc))
        return FSError(errno.EIO, str(exc))

    async def _read_group_hints(self) -> None:
        """Free counts of the groups this node has not loaded: from the lock value block
        where a lock with a valid one is held (statfs holds them all), else the header
        on disk, read with the event loop free (at mount: read without a lock, only
        hints for choosing where to allocate; the allocation itself reads the bitmap
        under the group's lock)."""
        from clusterfs.format.rgrp import decode_rgrp
        groups = [i for i in range(self.sb.rgrp_count)
                  if i not in self.alloc.groups and not self._free_from_lvb(i)]
        firsts = [self.sb.rgrp_location(i)[0] for i in groups]
        read = self._reader(await self._read_blocks_async(firsts))
        for i, first in zip(groups, firsts, strict=True):
            if i in self.alloc.groups:
                continue                 # loaded meanwhile: its copy is the newest
            try:
                self.alloc.free_hint[i] = decode_rgrp(read(first), first).free
            except FormatError as exc:
                raise self._corrupt(exc) from exc

    def _free_from_lvb(self, index: int) -> bool:
        """Take group `index`'s free count from its held lock's value block, if valid
        (an EX holder that died without releasing leaves it invalid: then the header
        is read, and the bitmap counted when the group is loaded)."""
        glock = self.glocks.glocks.get(("rgrp", index))
        lock = glock.lock if glock is not None else None
        if lock is None or not lock.lvb_valid:
            return False
        free = decode_free_lvb(bytes(lock.lvb))
        if free is None:
            return False
        self.alloc.free_hint[index] = free
        return True

    def _granted_rgrp(self, glock: Glock) -> None:
        """A fresh grant of a group's lock brings the free count its last EX holder
        left: a better hint for choosing groups than the one read at mount."""
        self._free_from_lvb(glock.name[1])

    async def read_groups_ahead(self, held: list[Glock]) -> dict[int, bytes]:
        """(Under their locks.) The header and bitmap blocks of the held groups not
        loaded yet, read with the event loop free, for _group()."""
        blocks: list[int] = []
        for glock in held:
            if glock.name[1] not in self.alloc.groups:
                first, length = self.sb.rgrp_location(glock.name[1])
                blocks += range(first, first + 1 + bitmap_blocks_for(length))
        return await self._read_blocks_async(blocks) if blocks else {}

    def _home_start(self) -> int:
        """The first block of this node's home group: where a cluster node allocates
        what has no better place (a new inode, a file's first blocks of its own)."""
        return self.sb.rgrp_location(self.home_group)[0]

    def _group(self, glock: Glock, ahead: dict[int, bytes] | None = None) -> ResourceGroup:
        """The group its held glock covers, loaded from disk on first use after a grant
        (the previous holder flushed it home before letting go); `ahead`: its blocks
        read already (read_groups_ahead), unless the journal holds them newer."""
        index = glock.name[1]
        group = self.alloc.groups.get(index)
        if group is None:
            first, _ = self.sb.rgrp_location(index)
            try:
                group = ResourceGroup.load(self._reader(ahead or {}), first)
            except (FormatError, StorageError) as exc:
                raise self._corrupt(exc) from exc
            self.alloc.groups[index] = group
            self.alloc.free_hint[index] = group.free
        return group

    def _inode(self, ino: int, by_name: bool = False, kernel: bool = True) -> CachedInode:
        """The cached inode, read under the lock the caller holds.

        by_name: reached through a directory entry checked under its parent's lock
        (or just created), so a block that is not an inode is corruption; otherwise,
        in a cluster, another node may have freed the inode and reused its block since
        (ESTALE). kernel: a number the kernel handed back, which must still name the
        generation it was given (else ESTALE); False for our own lists (unlinked,
        orphans), which name whatever generation the block holds."""
        node = self.inodes.get(ino)
        if node is None:
            if not self.sb.rgrp_start <= ino < self.sb.total_blocks:
                raise FSError(errno.ESTALE, f"inode {ino} out of range")
            try:
                disk = decode_inode(self.blocks.read_meta(ino), ino)
                if disk.mode == 0 or self.freed.get(ino) == disk.generation:
                    raise FSError(errno.ENOENT, f"inode {ino} was deleted")
                self.freed.pop(ino, None)        # its block holds a new inode now
                node = CachedInode(disk, self.blocks.read_meta)
            except FormatError as exc:
                if ino in self.freed:
                    # the kernel still names an inode this node deleted, and its block
                    # holds something else now: stale, not corrupt
                    raise FSError(errno.ENOENT, f"inode {ino} was deleted") from exc
                if self.clustered and not by_name:
                    # freed by another node and its block reused: the kernel's number
                    # is stale (ESTALE makes a path walk look the name up again)
                    raise FSError(errno.ESTALE, f"inode {ino}: stale ({exc})") from exc
                raise self._corrupt(exc) from exc
            except StorageError as exc:
                raise self._corrupt(exc) from exc
            self.inodes.put(ino, node)
        if kernel and not by_name and self.clustered and \
                self.handed.get(ino, node.d.generation) != node.d.generation:
            # the kernel's number names an inode freed since (another node reused the
            # block for a new one): stale, and the VFS looks the path up again
            raise FSError(errno.ESTALE, f"inode {ino}: generation changed")
        return node

    def _dirty(self, obj) -> None:
        self.txn.add(obj)

    def _hold(self, ex: Iterable[int] = (), pr: Iterable[int] = (),
              alloc: tuple[int, int] | None = None,
              frees: Callable[[], Iterable[int]] | None = None, write: bool = True,
              data: list[tuple[tuple, Mode]] | tuple = (),
              names: Iterable[tuple[int, bytes | None]] = (),
              edges: tuple[int, Callable[[CachedInode], Iterable[int]]] | None = None
              ) -> _Hold:
        """Take data-range and inode locks (data_locks()), then the resource groups
        the body may allocate from or free into, load those groups, run the body, then
        maybe commit. names: the (directory, name) pairs the body looks up (name None:
        it lists the directory), whose leaves are read before it runs. edges: (inode,
        f) where f(its cached inode) names the logical blocks the body changes only in
        part, read before it runs."""
        return _Hold(self, ex, pr, alloc, frees, write, data, names, edges)

    def data_locks(self, ino: int, off: int, size: int, mode: Mode) -> list[tuple[tuple, Mode]]:
        """The ("data", ino, chunk) glocks covering bytes [off, off + size) of a file,
        in a cluster; none on one node (nothing to be coherent with)."""
        if not self.clustered or size <= 0:
            return []
        first, last = off // DATA_LOCK_BYTES, (off + size - 1) // DATA_LOCK_BYTES
        return [(("data", ino, c), mode) for c in range(first, last + 1)]

    async def _retrying(self, run, goal: int, want: int):
        """Run `run(alloc)` and retry an ENOSPC after freeing quarantined blocks
        or with every resource group."""
        attempts = [(goal, want), (goal, BIG), (goal, BIG)]
        for n, alloc in enumerate(attempts):
            try:
                return await run(alloc)
            except FSError as exc:
                if exc.errno != errno.ENOSPC or n == len(attempts) - 1:
                    raise
                if self.alloc.quarantined:
                    await self.txn.commit(checkpoint=True)
                elif len(self.alloc.groups) == self.sb.rgrp_count:
                    raise

    def _reserve(self, goal: int, count: int) -> list[int]:
        """Allocate `count` single blocks near goal before changing anything."""
        blocks: list[int] = []
        try:
            while len(blocks) < count:
                start, n = self.alloc.allocate(goal, count - len(blocks), self._dirty)
                blocks.extend(range(start, start + n))
        except FSError:
            self._unreserve(blocks)
            raise
        return blocks

    def _taker(self, reserve: list[int], goal: int) -> Callable[[], int]:
        """Hand out reserved blocks; a rare cascade of directory splits may need more."""
        return lambda: reserve.pop() if reserve else self._reserve(goal, 1)[0]

    def _unreserve(self, blocks: list[int]) -> None:
        """Give back reserved blocks that were never used (no quarantine needed)."""
        for b in blocks:
            group = self.alloc.groups[self.alloc.group_of(b)]
            group.give_back(b - group.header.first, 1)
            self.alloc.free_hint[group.index] = group.free
        blocks.clear()

    def _release(self, start: int, count: int) -> None:
        self.alloc.release(start, count, self._dirty)

    # ================================================================ attributes
    async def getattr(self, ino: int) -> CachedInode:
        async with self._hold(pr=[ino], write=False):
            return self._inode(ino)

    async def lookup(self, parent: int, name: bytes) -> CachedInode | None:
        """The named inode (counted as a kernel reference), or None if there is none."""
        while True:
            async with self._hold(pr=[parent], write=False,
                                  names=self._lookup_names(parent, name)):
                ino = self._find_or_none(parent, name)
                listed = self._listed_pending.get(ino) if ino is not None else None
                ahead = self._scan_ahead(parent, ino) if self.clustered and \
                    listed is None else []
                node = self._cached_child(parent, ino) if not ahead else None
            if node is not None:
                self.count_lookup(node.d.ino, node.d.generation)
                return node
            if ino is None:
                return None
            if listed is not None:
                await listed.wait()      # a listing's batch brings it in (warm_listed)
                continue
            if ahead:
                await self.prefetch(ahead)
            node = await self._named_inode(parent, name, ino)
            if node is not None:
                self.count_lookup(ino, node.d.generation)
                return node

    def _lookup_names(self, parent: int, name: bytes) -> list[tuple[int, bytes | None]]:
        """What a lookup's hold reads ahead: the name's leaf, and every leaf when the
        lookup is likely to scan ahead (_scan_ahead lists the directory)."""
        misses, last = self._scan_misses.get(parent, (0, 0.0))
        if (self.clustered and misses + 1 >= SCAN_AFTER
                and time.monotonic() - last < SCAN_WINDOW):
            node = self.inodes.get(parent)
            if node is not None and node.dir is not None and \
                    node.dir.leaf_count <= SCAN_LEAVES_MAX:
                return [(parent, name), (parent, None)]
        return [(parent, name)]

    def _scan_ahead(self, parent: int, ino: int | None) -> list[int]:
        """The inodes a lookup of `ino` in `parent` should bring in with it: none,
        unless `parent` is being scanned (SCAN_AFTER) and `ino` is not cached; then
        `ino` and the next of the directory's inodes by number. Under the directory's
        lock."""
        if ino is None or ino in self.inodes:
            return []
        now = time.monotonic()
        misses, last = self._scan_misses.get(parent, (0, 0.0))
        misses = misses + 1 if now - last < SCAN_WINDOW else 1
        if len(self._scan_misses) > 1024:        # directories visited once, long ago
            self._scan_misses.clear()
        self._scan_misses[parent] = (min(misses, SCAN_AFTER), now)
        if misses < SCAN_AFTER:
            return []
        d = self._inode(parent).dir
        if d is None or (d.hashed and d.leaf_count > SCAN_LEAVES_MAX):
            return []
        if d.unread_leaves(None):
            # listing it would read them here, on the event loop (its hold read only
            # this name's leaf: the directory was not cached, or not yet scanned, when
            # the hold named what to read); the next lookup's hold reads them all
            return []
        numbers = d.inode_numbers()
        ahead: list[int] = []
        for child in itertools.islice(numbers, bisect.bisect_left(numbers, ino), None):
            if child not in self.inodes:
                ahead.append(child)
                if len(ahead) == SCAN_BATCH:
                    break
        return ahead

    def _cached_child(self, parent: int, ino: int | None) -> CachedInode | None:
        """(Under the parent's lock, name just found.) The child inode when its own lock
        is cached, taken without a wait, or it was made here under the parent's lock
        and has no lock of its own yet (which the parent's covers): the lookup then
        needs one round of locks, not two (_named_inode). None when it would have to
        wait."""
        if ino is None:
            return None
        if self._unguarded_in.get(ino) == parent:
            return self._inode(ino, by_name=True)
        glock = self.glocks.hold_if_cached(("inode", ino), Mode.PR)
        if glock is None:
            return None
        try:
            return self._inode(ino, by_name=True)
        finally:
            self.glocks.release([glock])

    async def _named_inode(self, parent: int, name: bytes, ino: int) -> CachedInode | None:
        """The inode `name` in `parent` names, read while both are locked (in order) and
        the name still names it; None if it moved meanwhile. Reading the child under its
        own lock alone could read a block another node freed and reused since."""
        async with self._hold(pr=sorted({parent, ino}), write=False,
                              names=[(parent, name)]):
            if self._find_or_none(parent, name) != ino:
                return None
            return self._inode(ino, by_name=True)

    async def prefetch(self, inos: list[int]) -> None:
        """Load many inodes with few reads: readdir needs every entry's attributes, and
        inodes created together sit together on disk."""
        todo = sorted({i for i in inos if i not in self.inodes and
                       i not in self._unguarded_in and   # (their own lock would be EX)
                       self.sb.rgrp_start <= i < self.sb.total_blocks})
        if not todo:
            return
        if self.clustered:               # their locks, many requests in flight at once
            await self.glocks.warm((("inode", i), Mode.PR) for i in todo)
        async with self._hold(pr=todo, write=False):
            await self._load_runs(todo)

    def warm_listed(self, inos: list[int]) -> None:
        """(A cluster.) Bring in the inodes a listing has just named, in the background
        (run_list_ahead), nobody waiting: a stat of each often follows (ls -l), and its
        lookup then waits for this batch instead of locking and reading its inode
        alone; a listing alone (ls, find without stats) waits for none of it."""
        batch = [i for i in inos if i not in self.inodes and i not in self._unguarded_in]
        if not (self.clustered and self._listing_ahead and batch):
            return
        if len(self._listed) >= LIST_AHEAD_BATCHES:
            self._listed_done(*self._listed.popleft())      # dropped: nobody waits for it
        done = trio.Event()
        for ino in batch:
            self._listed_pending[ino] = done
        self._listed.append((batch, done))
        self._listed_kick.set()

    def _listed_done(self, batch: list[int], done: trio.Event) -> None:
        for ino in batch:
            if self._listed_pending.get(ino) is done:
                del self._listed_pending[ino]
        done.set()

    async def run_list_ahead(self) -> None:
        """For the mount's lifetime: prefetch what warm_listed queued, a listing's reply
        at a time (its locks requested together, its inodes read in runs). Best effort:
        what a failed batch did not bring in is left to the lookups."""
        self._listing_ahead = True
        try:
            while not self.closing:
                await self._listed_kick.wait()
                self._listed_kick = trio.Event()
                while self._listed and not self.closing:
                    batch, done = self._listed.popleft()
                    try:
                        await self.prefetch(batch)
                    except ClusterFSError as exc:   # (withdrawn, expelled: said already)
                        log.debug("list ahead: %s", exc)
                    finally:
                        self._listed_done(batch, done)
        finally:
            self._listing_ahead = False
            while self._listed:
                self._listed_done(*self._listed.popleft())

    async def load_missing(self, inos: list[int]) -> None:
        """(Under their locks.) Read the inodes of `inos` not cached, in runs."""
        todo = sorted({i for i in inos if i not in self.inodes and
                       self.sb.rgrp_start <= i < self.sb.total_blocks})
        if todo:
            await self._load_runs(todo)

    async def _load_runs(self, todo: list[int]) -> None:
        """(Under their locks.) Read the sorted inodes `todo` not cached yet in runs of
        up to PREFETCH_SPAN blocks, each with the event loop free (io_uring, else a
        worker thread): on a busy disk a read takes tens of milliseconds and more, and
        the event loop (heartbeats with it) must not wait for it (a survivor sweeping
        thousands of orphans read for 0.8 s in one step). The blocks their loading
        reads besides (a directory's hash table, extent blocks, an xattr block) are
        read the same way first. The locks held keep other nodes off these blocks
        meanwhile; what this node did to them meanwhile is newer, and _cache_loaded
        keeps it."""
        run: list[int] = []
        for ino in todo + [BIG]:
            if run and (ino - run[0] >= PREFETCH_SPAN):
                first, count = run[0], run[-1] - run[0] + 1
                try:
                    raw = await self.blocks.read_meta_run_async(first, count)
                except StorageError:
                    raw = None           # the per-inode path will report it
                if raw is not None:
                    disks = self._decode_run(first, raw, run)
                    extra = await self._read_blocks_async(
                        [b for d in disks for b in CachedInode.blocks_read_at_load(d)])
                    self._cache_loaded(disks, extra)
                run = []
            run.append(ino)

    async def load_leaves(self, names: Iterable[tuple[int, bytes | None]]) -> None:
        """(Under the directories' locks.) Read the directory leaves an operation will
        look in for these names (None: every leaf, a listing) and this node has not
        read, with the event loop free, as _load_runs does for inodes: a node that gets
        a directory's lock back after another node changed it reads each leaf anew.
        A chained leaf (past the deepest table) is known once the leaf before it is
        read: one round of reads per link."""
        names = list(names)
        tried: set[int] = set()          # (a leaf that did not decode is not read again)
        while True:
            wanted: dict[int, CachedInode] = {}
            for parent, name in names:
                node = self.inodes.get(parent)
                if node is not None and node.dir is not None:
                    for blk in node.dir.unread_leaves(name):
                        if blk not in tried:
                            wanted[blk] = node
            if not wanted:
                return
            tried.update(wanted)
            for blk, raw in (await self._read_blocks_async(list(wanted))).items():
                node = wanted[blk]
                if self.inodes.get(node.ino) is node and node.dir is not None:
                    node.dir.adopt_leaf(blk, raw)

    async def _read_blocks_async(self, blocks: list[int]) -> dict[int, bytes]:
        """Device copies of metadata blocks, read in runs of adjacent blocks with the
        event loop free; none of a block the journal holds newer (read_meta serves it
        from memory) or out of range, none where the device fails (the block's use
        reads it again and reports that)."""
        todo = sorted({b for b in blocks if self.blocks.is_meta(b)
                       and not self.blocks.logged(b)})
        out: dict[int, bytes] = {}
        i = 0
        while i < len(todo):
            j = i + 1
            while j < len(todo) and todo[j] == todo[j - 1] + 1 and j - i < PREFETCH_SPAN:
                j += 1
            try:
                raw = await self.blocks.read_meta_run_async(todo[i], j - i)
            except StorageError:
                raw = b""
            for k, blk in enumerate(todo[i:j]):
                if len(raw) >= (k + 1) * BLOCK_SIZE:
                    out[blk] = raw[k * BLOCK_SIZE : (k + 1) * BLOCK_SIZE]
            i = j
        return out

    def _loadable(self, ino: int) -> bool:
        """Whether an inode read from the device may be cached: not cached, freed here
        (its tombstone may not be home yet) or newer in the journal."""
        return not (ino in self.inodes or ino in self.freed or self.blocks.logged(ino))

    def _reader(self, ahead: dict[int, bytes]) -> Callable[[int], bytes]:
        """read_meta() that takes a block from `ahead` (read with the event loop free)
        unless the journal came to hold a newer copy meanwhile."""
        def read(blk: int) -> bytes:
            raw = ahead.get(blk)
            return raw if raw is not None and not self.blocks.logged(blk) \
                else self.blocks.read_meta(blk)
        return read

    def _decode_run(self, first: int, raw: bytes, wanted: list[int]) -> list[Inode]:
        """The inodes `wanted` of the run `raw` read from block `first` on that are to
        be cached: not cached, freed or logged already, no tombstone, decoding (one
        that does not is left for _inode(), which withdraws)."""
        out = []
        for ino in wanted:
            if not self._loadable(ino):
                continue
            at = (ino - first) * BLOCK_SIZE
            try:
                disk = decode_inode(raw[at : at + BLOCK_SIZE], ino)
            except FormatError:
                continue
            if disk.mode != 0:
                out.append(disk)         # (a tombstone: _inode() says ENOENT for it)
        return out

    def _cache_loaded(self, disks: list[Inode], extra: dict[int, bytes]) -> None:
        """Cache inodes read ahead, their other blocks from `extra` (what the cache or
        the journal came to hold of any of them meanwhile is newer and wins)."""
        read = self._reader(extra)
        for disk in disks:
            ino = disk.ino
            if not self._loadable(ino):
                continue
            try:
                self.inodes.put(ino, CachedInode(disk, read))
            except FormatError:
                continue                 # left for _inode(), which withdraws
        # a directory keeps `read` for its leaves: from now on it reads the newest copy
        extra.clear()

    async def readdir_nodes(self, parent: int, entries: list[tuple[bytes, int]]
                            ) -> list[CachedInode | None]:
        """The inodes of a run of a listing's entries (readdirplus), under one round of
        locks: the locks not cached are warmed together (in a cluster, many requests in
        one message per master), then the directory and every entry's inode are held at
        once, in order, those not cached read in a few runs, and each name checked to
        still name its inode. None for an entry gone since the listing was taken. (The
        caller counts the kernel reference with count_lookup once an entry is really
        in the reply.)"""
        inos = sorted({ino for _name, ino in entries})
        if self.clustered:
            await self.glocks.warm((("inode", i), Mode.PR) for i in inos
                                   if i not in self.inodes and i not in self._unguarded_in)
        async with self._hold(pr=sorted({parent, *inos}), write=False):
            # (a fresh grant dropped a clean copy kept from before: read those too)
            await self._load_runs([i for i in inos if i not in self.inodes and
                             self.sb.rgrp_start <= i < self.sb.total_blocks])
            return [self._listed_node(parent, name, ino) for name, ino in entries]

    def _listed_node(self, parent: int, name: bytes, ino: int) -> CachedInode | None:
        """(Both locked.) The inode `name` in `parent` names if it is still `ino`."""
        try:
            if self._find_or_none(parent, name) != ino:
                return None
            node = self._inode(ino, by_name=True)
        except FSError:
            return None                  # (gone; or corrupt: withdrawn, said so)
        return None if node.freed else node

    def count_lookup(self, ino: int, generation: int | None = None) -> None:
        """The kernel now holds one more reference to `ino` (undone by forget), of this
        generation (a cluster checks it on every use of the number: _inode)."""
        self.nlookup[ino] = self.nlookup.get(ino, 0) + 1
        if generation is not None:
            self.handed[ino] = generation

    def _find(self, parent: int, name: bytes) -> int:
        ino = self._find_or_none(parent, name)
        if ino is None:
            raise FSError(errno.ENOENT)
        return ino

    def _find_or_none(self, parent: int, name: bytes) -> int | None:
        p = self._inode(parent)
        if p.dir is None:
            raise FSError(errno.ENOTDIR)
        if len(name) > NAME_MAX:
            raise FSError(errno.ENAMETOOLONG)
        found = p.dir.get(name)
        return None if found is None else found[0]

    async def setattr(self, ino: int, *, mode: int | None = None, uid: int | None = None,
                      gid: int | None = None, size: int | None = None,
                      atime_ns: int | None = None, mtime_ns: int | None = None,
                      ctime_ns: int | None = None) -> CachedInode:
        if size is not None:
            await self.truncate(ino, size)
        async with self._hold(ex=[ino]):
            node = self._inode(ino)
            d = node.d
            if mode is not None:
                d.mode = stat.S_IFMT(d.mode) | stat.S_IMODE(mode)
            if uid is not None:
                d.uid = uid
            if gid is not None:
                d.gid = gid
            if atime_ns is not None:
                d.atime, d.atime_ns = divmod(atime_ns, 1_000_000_000)
            if mtime_ns is not None:
                d.mtime, d.mtime_ns = divmod(mtime_ns, 1_000_000_000)
            if ctime_ns is not None:
                d.ctime, d.ctime_ns = divmod(ctime_ns, 1_000_000_000)
            else:
                node.touch(m=False)
            self._dirty(node)
            return node

    # ================================================================ orphans
    def _load_orphans(self, slot: int,
                      read: Callable[[int], bytes] | None = None) -> OrphanList:
        blknos = self.sb.orphan_locations(slot)
        read = read or self.blocks.read_meta
        try:
            return OrphanList.decode([read(b) for b in blknos], blknos)
        except (FormatError, StorageError) as exc:
            raise FormatError(f"journal slot {slot}: {exc} (fsck --repair rewrites it)"
                              ) from exc

    async def _read_orphans(self, slot: int) -> OrphanList:
        """_load_orphans() with the event loop free while the device reads the slot's
        orphan blocks (in one run): the sweeper looks at every other slot's list each
        round."""
        ahead = await self._read_blocks_async(self.sb.orphan_locations(slot))
        return self._load_orphans(slot, self._reader(ahead))

    def kick_orphans(self) -> None:
        """Look at the orphan lists now (a journal recovery just ended)."""
        self._orphan_kick.set()

    async def run_orphan_sweeper(self) -> None:
        """For the mount's lifetime: take over the orphan lists of slots no live node
        holds, and free listed inodes no node has open any more; at mount, after each
        journal recovery, and every ORPHAN_SWEEP_INTERVAL seconds."""
        while not self.closing:
            if self.txn.withdrawn is None:
                async with self._sweeping:
                    try:
                        await self.adopt_orphans()
                        await self.sweep_orphans()
                    except ClusterFSError as exc:   # (withdrawn, expelled: said already)
                        log.warning("orphan sweep: %s", exc)
            with trio.move_on_after(ORPHAN_SWEEP_INTERVAL):
                await self._orphan_kick.wait()
            self._orphan_kick = trio.Event()

    async def adopt_orphans(self) -> int:
        """Move the orphan lists of journal slots that no live node holds (it died, or
        the whole cluster did, or it left some behind at unmount) into ours, each under
        that slot's journal lock, after every journal recovery the gate waits for."""
        gate = self.glocks.gate
        if gate is not None:
            await gate.wait_open()
        adopted = 0
        self._orphans_left_behind = False
        for slot in range(self.sb.journal_count):
            if slot == self.slot or self.closing:
                continue
            try:
                if not (await self._read_orphans(slot)).inodes:
                    continue             # a look without the lock: nothing to adopt
            except FormatError as exc:
                log.warning("orphan list of slot %d unreadable: %s", slot, exc)
                continue
            try:
                lock = await self.glocks.locks.lock(("journal", slot), Mode.EX, try_=True)
            except WouldBlock:
                continue                 # a live node's slot
            try:
                adopted += await self._adopt_slot(slot)
            finally:
                with trio.CancelScope(shield=True):
                    await self.glocks.locks.unlock(lock)
        return adopted

    async def _adopt_slot(self, slot: int) -> int:
        """Take as many of the departed slot's orphans into ours as ours has room for;
        the rest stay listed in that slot (never dropped: an inode listed nowhere is
        freed by nobody, and fsck finds it leaked), to be taken once ours has room, or
        by the node that claims the slot next."""
        theirs = await self._read_orphans(slot)
        if not theirs.inodes:
            return 0
        left_out = self.orphans.update(sorted(theirs.inodes))
        if left_out:
            self._orphans_left_behind = True
        if len(left_out) == len(theirs):  # ours is full: nothing moves, nothing to write
            log.info("left %d orphan inodes of journal slot %d listed there: ours is full",
                     len(left_out), slot)
            return 0
        rest = OrphanList.rewritten(theirs.blknos, left_out)
        # both lists in one transaction, written home before the slot's lock goes (a
        # node that claims the slot next must read what is left there; and our journal
        # must never hold a block another node may write later)
        self._dirty(self.orphans)
        self._dirty(rest)
        await self.txn.commit(checkpoint=True)
        taken = len(theirs) - len(left_out)
        log.info("adopted %d orphan inodes of journal slot %d%s", taken, slot,
                 f" ({len(left_out)} left listed there: ours is full)" if left_out else "")
        return taken

    def _orphan_room(self) -> None:
        """An entry of ours went: if a departed slot still lists orphans ours had no
        room for, have the sweeper adopt them now."""
        if self._orphans_left_behind:
            self._orphan_kick.set()

    async def sweep_orphans(self) -> int:
        """Free each listed inode that still has no name and that no node has open;
        drop entries whose inode another node freed meanwhile. The freed count. The
        inodes are brought in SWEEP_BATCH at a time (prefetch: their locks together,
        their blocks read in runs off the event loop), not read one by one."""
        freed = 0
        listed = sorted(self.orphans.inodes)
        for start in range(0, len(listed), SWEEP_BATCH):
            if self.closing or self.txn.withdrawn is not None:
                break
            # unlinked in this life: the usual path frees those
            batch = [i for i in listed[start : start + SWEEP_BATCH] if i not in self.unlinked]
            await self.prefetch(batch)
            for ino in batch:
                if self.closing or self.txn.withdrawn is not None:
                    break
                if ino not in self.unlinked:
                    freed += await self._sweep_one(ino)
        if freed:
            # one line a sweep: a node that died in stress-ng's `open` leaves thousands
            log.info("orphan sweep: freed %d inode%s unlinked while open (their openers "
                     "gone)", freed, "" if freed == 1 else "s")
        return freed

    async def _sweep_one(self, ino: int) -> int:
        outcome = await self._free_if_unused_anywhere(ino)
        if outcome == "gone":            # (freed with its entry otherwise)
            async with self._hold():
                if self.orphans.discard(ino):
                    self._dirty(self.orphans)
                    self._orphan_room()
        if outcome != "freed":
            return 0
        log.debug("freed orphan inode %d (unlinked while open, its opener gone)", ino)
        return 1

    # ================================================================ whole fs
    async def usage(self) -> Usage:
        """Blocks in all, free, quarantined. In a cluster, statfs takes every group's lock
        in PR for a moment: a node holding one in EX flushes it home and keeps it in PR,
        so the headers read here count what every node has done (an occasional `df`
        costs the writers one conversion back to EX each)."""
        if self.clustered:
            groups = [(("rgrp", i), Mode.PR) for i in range(self.sb.rgrp_count)]
            async with self.glocks.hold(groups):
                await self._read_group_hints()
                return self._usage()
        return self._usage()

    def _usage(self) -> Usage:
        return Usage(self.alloc.data_blocks(), self.alloc.free_blocks(), self.alloc.quarantined)

    async def shutdown(self) -> None:
        """Unmount: free unlinked inodes the kernel no longer holds, commit, checkpoint,
        mark the journal clean, give locks back."""
        self.closing = True
        self._orphan_kick.set()
        async with self._sweeping:       # let a sweep under way finish its inode
            pass
        with trio.move_on_after(UNMOUNT_FREE_TIMEOUT) as waited:
            for ino in list(self.unlinked):
                self.nlookup.pop(ino, None)
                self.opens.pop(ino, None)
                if self.clustered:
                    # our own iopen PR first: with it held the EX try below always
                    # failed ("open elsewhere") and the file stayed in our orphan list
                    # (closes the kernel had not sent yet when the unmount came)
                    self._iopen_owed.discard(ino)
                    await self._iopen_release(ino)
                try:
                    await self._maybe_free(ino)
                except FSError as exc:   # one inode must not keep the journal dirty
                    log.warning("unmount: unlinked inode %d not freed: %s", ino, exc)
        if waited.cancelled_caught:
            # no quorum left to lock them (the other nodes went first): never hang an
            # unmount; fsck --repair frees what is left
            log.warning("unmount: %d unlinked inodes not freed (their locks could not "
                        "be had in %d s): %s", len(self.unlinked), UNMOUNT_FREE_TIMEOUT,
                        sorted(self.unlinked)[:10])
        if not self.txn.withdrawn:
            await self.txn.close()
        elif self.clustered:
            # our journal may hold what never reached home: give no lock back, so the
            # other nodes treat us as failed and replay it (node/mount_cmd.py)
            log.error("unmount of a withdrawn node: keeping every lock; the other nodes "
                      "replay journal %d", self.slot)
            return
        for ino in list(self.iopen):
            await self._iopen_release(ino)
        for glock in self.glocks.glocks.values():
            if glock.name[0] == "rgrp":
                self._leave_free_count(glock)
        await self.glocks.release_all()
