"""FileSystem: namespace and file operations on one mounted clusterfs.

Each public operation is `async`: it takes the glocks it needs (inodes first,
sorted; then resource groups, sorted) and then runs a synchronous body, so
bodies never interleave on this node. Allocation happens before any change in a
body (`_reserve`), so ENOSPC leaves nothing half done. Inode numbers here are
block addresses (the FUSE adapter maps the root to 1).
"""

from __future__ import annotations

import bisect
import errno
import itertools
import logging
import stat
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import trio

from clusterfs.cache.blocks import Blocks
from clusterfs.cache.glock import Glock, GlockManager
from clusterfs.cache.inodes import InodeCache
from clusterfs.cache.transaction import Covered, TransactionManager
from clusterfs.dlm.interface import Lock, Mode
from clusterfs.errors import ClusterFSError, FormatError, FSError, StorageError, WouldBlock
from clusterfs.format import extent as fext
from clusterfs.format.block import BLOCK_SIZE
from clusterfs.format.directory import NAME_MAX
from clusterfs.format.inode import (
    F_EXTENTS,
    F_STUFFED,
    PAYLOAD_MAX,
    XATTR_BLOCK_MAX,
    Inode,
    decode_inode,
    encode_inode,
    encode_xattrs,
)
from clusterfs.format.superblock import Superblock
from clusterfs.fs import extents as ext
from clusterfs.fs.alloc import Allocator, ResourceGroup, decode_free_lvb, encode_free_lvb
from clusterfs.fs.directory import Directory
from clusterfs.fs.inode import CachedInode
from clusterfs.fs.kernelforget import KernelForget
from clusterfs.fs.orphans import OrphanList

log = logging.getLogger(__name__)
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
XATTR_NAMESPACES = (b"user.", b"trusted.", b"security.")
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
SCAN_LEAVES_MAX = 256    # a hashed directory with more leaves is not scanned ahead
READAHEAD_TRIGGER = 128 * 1024   # a read this large is taken as sequential
# Device read-ahead for a sequential reader: keep up to READAHEAD_BLOCKS (32 MiB)
# advised ahead of it, topped up in steps of READAHEAD_STEP (8 MiB). A 4 MiB window
# left most 1 MiB reads waiting on the disk (half the read time in pread, cold);
# a deep queue keeps the disk streaming while we answer FUSE.
READAHEAD_BLOCKS = 8192
READAHEAD_STEP = 2048
SYMLINK_MAX = 4095
# In a cluster a file's data is locked by byte range, in chunks of this many bytes
# (("data", ino, chunk) glocks: docs/locking.md): an overwrite in place holds the
# inode in PR and its chunks in EX, so nodes writing disjoint parts of one file
# run at once; a reader holds its chunks in PR.
DATA_LOCK_BYTES = 4 << 20
# An overwrite in place leaves the file's times alone when they are this recent
# (and not in the future): the times live in the inode, which the overwrite holds
# only in PR. A write after a longer pause takes the inode in EX and sets them, so
# mtime and ctime lag a cluster's writes by less than this.
WRITE_TIMES_SLACK_NS = 1_000_000_000
UNMOUNT_FREE_TIMEOUT = 20   # seconds an unmount waits for the locks to free unlinked inodes
ORPHAN_SWEEP_INTERVAL = 30  # seconds between looks at orphan lists (sooner after a recovery)


def dtype_of(mode: int) -> int:
    return stat.S_IFMT(mode) >> 12


class _Hold:
    """The async context of one operation body (see FileSystem._hold). A plain class
    rather than a generator: it runs for every request."""

    __slots__ = ("fs", "ex", "pr", "alloc", "frees", "write", "data", "taken")

    def __init__(self, fs: FileSystem, ex, pr, alloc, frees, write: bool, data) -> None:
        self.fs, self.ex, self.pr, self.alloc, self.frees, self.write, self.data = \
            fs, ex, pr, alloc, frees, write, data
        self.taken: list = []

    async def __aenter__(self) -> None:
        fs = self.fs
        if self.write:
            fs.txn.check_writable()
        wanted = [(("inode", i), Mode.EX) for i in self.ex]
        wanted += [(("inode", i), Mode.PR) for i in self.pr]
        wanted += self.data             # ("data", ino, chunk): sorted before the inodes
        self.taken = await fs.glocks.acquire(wanted)
        try:
            groups: set[int] = set()
            if self.alloc is not None:
                groups.update(fs.alloc.groups_for(*self.alloc))
            if self.frees is not None:
                groups.update(fs.alloc.group_of(b) for b in self.frees())
            if groups:
                held = await fs.glocks.acquire([(("rgrp", g), Mode.EX) for g in groups])
                self.taken += held
                for glock in held:
                    fs._group(glock)
            fs.alloc.usable = groups
        except BaseException:
            fs.glocks.release(self.taken)
            raise

    async def __aexit__(self, exc_type, exc, tb) -> None:
        self.fs.alloc.usable = set()
        self.fs.glocks.release(self.taken)
        if exc_type is not None and issubclass(exc_type, FormatError):
            # a block read during the body (a directory leaf is read when first
            # needed) did not decode: corruption, as at an inode's load
            self.fs.txn.withdraw(str(exc))
        if self.write and exc_type is None:
            await self.fs.txn.end_operation()


class _Tombstone:
    """What a freed inode's block says until it is reused: mode 0, nlink 0. Another node
    (or this one's kernel) that still names the inode reads it as gone (ENOENT)."""

    def __init__(self, ino: int) -> None:
        self.ino = ino

    def block_estimate(self) -> int:
        return 1

    def to_blocks(self) -> dict[int, bytes]:
        return {self.ino: bytes(encode_inode(Inode(ino=self.ino, mode=0, nlink=0, blocks=0)))}


class _Changed(Exception):
    """A name moved between an operation's look under PR and its change under EX."""


@dataclass
class Usage:
    blocks: int
    free: int
    quarantined: int


class FileSystem:
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
        # cluster: directory -> inodes created in it whose own lock is not held here
        # yet (mknod takes it just after): until then the directory's lock covers
        # their blocks, so its demote writes them home too (_covered_by)
        self._unguarded: dict[int, set[int]] = {}
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
        self.orphans = self._load_orphans(self.slot)
        self._orphan_kick = trio.Event()
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
        self._load_group_hints()

    # ================================================================ plumbing
    def _corrupt(self, exc: Exception) -> FSError:
        self.txn.withdraw(str(exc))
        return FSError(errno.EIO, str(exc))

    def _load_group_hints(self) -> None:
        """Free counts of the groups this node has not loaded: from the lock value block
        where a lock with a valid one is held (statfs holds them all), else the header
        on disk (at mount: read without a lock, only hints for choosing where to
        allocate; the allocation itself reads the bitmap under the group's lock)."""
        from clusterfs.format.rgrp import decode_rgrp
        for i in range(self.sb.rgrp_count):
            if i in self.alloc.groups:
                continue                 # held: its loaded copy is the newest
            if self._free_from_lvb(i):
                continue
            first, _ = self.sb.rgrp_location(i)
            try:
                self.alloc.free_hint[i] = decode_rgrp(self.blocks.read_meta(first), first).free
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

    def _group(self, glock: Glock) -> ResourceGroup:
        """The group its held glock covers, loaded from disk on first use after a grant
        (the previous holder flushed it home before letting go)."""
        index = glock.name[1]
        group = self.alloc.groups.get(index)
        if group is None:
            first, _ = self.sb.rgrp_location(index)
            try:
                group = ResourceGroup.load(self.blocks.read_meta, first)
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
              data: list[tuple[tuple, Mode]] | tuple = ()) -> _Hold:
        """Take data-range and inode locks (data_locks()), then the resource groups
        the body may allocate from or free into, load those groups, run the body, then
        maybe commit."""
        return _Hold(self, ex, pr, alloc, frees, write, data)

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
            rel = b - group.header.first
            group.bits[rel >> 3] &= ~(1 << (rel & 7)) & 0xFF
            group.free += 1
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
            async with self._hold(pr=[parent], write=False):
                ino = self._find_or_none(parent, name)
                ahead = self._scan_ahead(parent, ino) if self.clustered else []
                node = self._cached_child(ino) if not ahead else None
            if node is not None:
                self.count_lookup(node.d.ino, node.d.generation)
                return node
            if ino is None:
                return None
            if ahead:
                await self.prefetch(ahead)
            node = await self._named_inode(parent, name, ino)
            if node is not None:
                self.count_lookup(ino, node.d.generation)
                return node

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
        numbers = d.inode_numbers()
        ahead: list[int] = []
        for child in itertools.islice(numbers, bisect.bisect_left(numbers, ino), None):
            if child not in self.inodes:
                ahead.append(child)
                if len(ahead) == SCAN_BATCH:
                    break
        return ahead

    def _cached_child(self, ino: int | None) -> CachedInode | None:
        """(Under the parent's lock, name just found.) The child inode when its own lock
        is cached, taken without a wait: the lookup then needs one round of locks, not
        two (_named_inode). None when it would have to wait."""
        if ino is None:
            return None
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
        async with self._hold(pr=sorted({parent, ino}), write=False):
            if self._find_or_none(parent, name) != ino:
                return None
            return self._inode(ino, by_name=True)

    async def prefetch(self, inos: list[int]) -> None:
        """Load many inodes with few reads: readdir needs every entry's attributes, and
        inodes created together sit together on disk."""
        todo = sorted({i for i in inos if i not in self.inodes and
                       self.sb.rgrp_start <= i < self.sb.total_blocks})
        if not todo:
            return
        if self.clustered:               # their locks, many requests in flight at once
            await self.glocks.warm((("inode", i), Mode.PR) for i in todo)
        async with self._hold(pr=todo, write=False):
            run: list[int] = []
            for ino in todo + [BIG]:
                if run and (ino - run[0] >= PREFETCH_SPAN):
                    self._load_run(run[0], run[-1] - run[0] + 1, set(run))
                    run = []
                run.append(ino)

    def _load_run(self, first: int, count: int, wanted: set[int]) -> None:
        try:
            raw = self.blocks.read_meta_run(first, count)
        except StorageError:
            return                       # the per-inode path will report it
        for ino in wanted:
            if ino in self.inodes or ino in self.freed or \
                    self.blocks.logged(ino):
                continue                 # (a freed one's tombstone may not be home yet)
            at = (ino - first) * BLOCK_SIZE
            try:
                disk = decode_inode(raw[at : at + BLOCK_SIZE], ino)
                if disk.mode == 0:
                    continue             # a tombstone: _inode() says ENOENT for it
                if disk.flags & F_STUFFED or not stat.S_ISDIR(disk.mode):
                    self.inodes.put(ino, CachedInode(disk, self.blocks.read_meta))
            except FormatError:
                continue                 # left for _inode(), which withdraws

    def count_lookup(self, ino: int, generation: int | None = None) -> None:
        """The kernel now holds one more reference to `ino` (undone by forget), of this
        generation (a cluster checks it on every use of the number: _inode)."""
        self.nlookup[ino] = self.nlookup.get(ino, 0) + 1
        if generation is not None:
            self.handed[ino] = generation

    async def lookup_for_readdir(self, parent: int, name: bytes, ino: int) -> CachedInode:
        """Attributes of a directory entry (the caller counts the kernel reference with
        count_lookup once the entry is really in the reply); ENOENT if the entry is gone
        since the listing was taken."""
        node = await self._named_inode(parent, name, ino)
        if node is None or node.freed:
            raise FSError(errno.ENOENT)
        return node

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

    # ================================================================ creating
    async def mknod(self, parent: int, name: bytes, mode: int, rdev: int, uid: int,
                    gid: int, target: bytes = b"", open_it: bool = False) -> CachedInode:
        """Create; with open_it the new inode also counts as opened (FUSE create),
        which spares a second round of locks for the open."""
        if len(name) > NAME_MAX:
            raise FSError(errno.ENAMETOOLONG)
        if stat.S_ISLNK(mode) and len(target) > SYMLINK_MAX:
            raise FSError(errno.ENAMETOOLONG, "symlink target too long")

        async def run(alloc):
            async with self._hold(ex=[parent], alloc=alloc):
                return self._create(parent, name, mode, rdev, uid, gid, target)

        node = await self._retrying(run, self._create_goal(parent), 8)
        if self.clustered:
            # the new inode's own lock, so that a node still caching an earlier inode
            # of this number (freed since) is told to drop it
            async with self._hold(ex=[node.ino], write=False):
                node = self._inode(node.ino, by_name=True)   # (ours: just created)
                self._unguarded.get(parent, set()).discard(node.ino)
        self.count_lookup(node.ino, node.d.generation)
        if open_it:
            await self._iopen_hold(node.ino)
            self.opens[node.ino] = self.opens.get(node.ino, 0) + 1
        return node

    def _create(self, parent: int, name: bytes, mode: int, rdev: int, uid: int, gid: int,
                target: bytes) -> CachedInode:
        p = self._inode(parent)
        if p.dir is None:
            raise FSError(errno.ENOTDIR)
        if p.d.nlink == 0:
            raise FSError(errno.ENOENT, "directory was removed")
        if p.dir.get(name) is not None:
            raise FSError(errno.EEXIST)
        if p.d.mode & stat.S_ISGID:
            gid = p.d.gid
            if stat.S_ISDIR(mode):
                mode |= stat.S_ISGID
        goal = self._create_goal(parent)
        reserve = self._reserve(goal, 1 + p.dir.blocks_needed_for_insert())
        ino = reserve.pop(0)
        self.freed.pop(ino, None)
        now_s, now_ns = divmod(time.time_ns(), 1_000_000_000)
        is_dir = stat.S_ISDIR(mode)
        disk = Inode(ino=ino, mode=mode, uid=uid, gid=gid, nlink=2 if is_dir else 1,
                     flags=F_STUFFED, rdev=rdev, generation=time.time_ns() & 0xFFFFFFFF,
                     parent=parent if is_dir else 0, atime=now_s, mtime=now_s, ctime=now_s,
                     atime_ns=now_ns, mtime_ns=now_ns, ctime_ns=now_ns,
                     size=0)
        node = CachedInode(disk, self.blocks.read_meta)
        if is_dir:
            node.dir = Directory()
        self.inodes.put(ino, node)
        if self.clustered:
            self._unguarded.setdefault(parent, set()).add(ino)
        if target:
            self._write(node, 0, target)    # stuffed when short, a data block when long
        p.dir.add(name, ino, dtype_of(mode), self._taker(reserve, goal), self._free_meta)
        self._unreserve(reserve)
        if is_dir:
            p.d.nlink += 1
        p.d.size = self._dir_size(p)
        p.touch()
        self._dirty(p)
        self._dirty(node)
        return node

    def _create_goal(self, parent: int) -> int:
        """Where a new inode should go: near its parent on one node; in a cluster in
        this node's home group, so nodes creating in one directory do not all want
        the parent's group."""
        if not self.clustered:
            return parent
        return self.sb.rgrp_location(self.home_group)[0]

    def _free_meta(self, blkno: int) -> None:
        self._release(blkno, 1)

    @staticmethod
    def _dir_size(node: CachedInode) -> int:
        assert node.dir is not None
        if node.dir.hashed:
            return BLOCK_SIZE * (1 + node.dir.leaf_count + len(node.dir.table_blocks))
        return node.dir.linear_bytes

    async def link(self, ino: int, parent: int, name: bytes) -> CachedInode:
        if len(name) > NAME_MAX:
            raise FSError(errno.ENAMETOOLONG)

        async def run(alloc):
            async with self._hold(ex=sorted({ino, parent}), alloc=alloc):
                node = self._inode(ino)
                if node.dir is not None:
                    raise FSError(errno.EPERM, "hard link to a directory")
                p = self._inode(parent)
                if p.dir is None:
                    raise FSError(errno.ENOTDIR)
                if p.dir.get(name) is not None:
                    raise FSError(errno.EEXIST)
                if node.d.nlink == 0:
                    raise FSError(errno.ENOENT)
                reserve = self._reserve(parent, p.dir.blocks_needed_for_insert())
                p.dir.add(name, ino, dtype_of(node.d.mode), self._taker(reserve, parent),
                          self._free_meta)
                self._unreserve(reserve)
                node.d.nlink += 1
                node.touch(m=False)
                p.d.size = self._dir_size(p)
                p.touch()
                self._dirty(p)
                self._dirty(node)
                return node

        node = await self._retrying(run, parent, 4)
        self.count_lookup(ino, node.d.generation)
        return node

    # ================================================================ removing
    async def unlink(self, parent: int, name: bytes, want_dir: bool = False) -> None:
        while True:
            async with self._hold(pr=[parent], write=False):
                ino = self._find(parent, name)
            # the victim's lock is taken with the parent's, in order; if the name
            # moved meanwhile (another node, or another request here), look again
            async with self._hold(ex=sorted({parent, ino})):
                if self._find(parent, name) == ino:
                    self._unlink(parent, name, ino, want_dir)
                    break
        await self._maybe_free(ino)

    def _unlink(self, parent: int, name: bytes, ino: int, want_dir: bool) -> None:
        p, node = self._inode(parent), self._inode(ino, by_name=True)
        if want_dir:
            if node.dir is None:
                raise FSError(errno.ENOTDIR)
            if len(node.dir):
                raise FSError(errno.ENOTEMPTY)
        elif node.dir is not None:
            raise FSError(errno.EISDIR)
        self._remove_entry(p, name, node)

    def _remove_entry(self, p: CachedInode, name: bytes, node: CachedInode) -> None:
        assert p.dir is not None
        p.dir.remove(name)
        if node.dir is not None:
            p.d.nlink -= 1
            node.d.nlink = 0
        else:
            node.d.nlink -= 1
        if node.d.nlink == 0:
            self._orphaned(node.ino)
        p.d.size = self._dir_size(p)
        p.touch()
        node.touch(m=False)
        self._dirty(p)
        self._dirty(node)

    async def _maybe_free(self, ino: int) -> None:
        """Free an inode this node unlinked, once nothing here has it open and the
        kernel no longer looks it up (its forget). In a cluster the iopen lock decides
        instead (_reap_if_unlinked), at once: a kernel reference that outlives the free
        then meets ENOENT (see _inode), never the freed blocks. (Its cached copy may
        have been dropped by a demote meanwhile, so it is loaded again under the lock.)"""
        if ino not in self.unlinked or self.opens.get(ino, 0) > 0 or self.txn.withdrawn:
            return
        if self.clustered:
            await self._reap_if_unlinked(ino)
            return
        if self.nlookup.get(ino, 0) > 0:
            return
        await self._free_if_unlinked(ino)
        self.unlinked.discard(ino)

    async def _free_if_unlinked(self, ino: int) -> bool:
        """Under its lock and its groups' locks: free `ino` if it still has no link."""
        async with self._hold(ex=[ino], frees=lambda: self._owned_blocks(
                self._inode(ino, kernel=False))):
            node = self._inode(ino, kernel=False)
            if node.d.nlink == 0 and not node.freed:
                self._free_inode(node)
                return True
            return False

    def _owned_blocks(self, node: CachedInode) -> list[int]:
        blocks = [node.ino] + node.ext_blocks + [e.pblk for e in node.extents]
        if node.d.xattr_blk:
            blocks.append(node.d.xattr_blk)
        if node.dir is not None:
            blocks += node.dir.blocks_owned()
        return blocks

    def _free_inode(self, node: CachedInode) -> None:
        for e in node.extents:
            self._release(e.pblk, e.count)
        for blk in node.ext_blocks:
            self._release(blk, 1)
        if node.d.xattr_blk:
            self._release(node.d.xattr_blk, 1)
        if node.dir is not None:
            for blk in node.dir.blocks_owned():
                self._release(blk, 1)
        self._release(node.ino, 1)
        self.freed[node.ino] = node.d.generation
        node.freed = True
        if self.orphans.discard(node.ino):
            self._dirty(self.orphans)
        self.txn.discard(node)
        self.txn.add(_Tombstone(node.ino))   # so a node still naming it sees it is gone
        self.inodes.discard(node.ino)
        self.nlookup.pop(node.ino, None)
        self.handed.pop(node.ino, None)
        self.opens.pop(node.ino, None)

    def _orphaned(self, ino: int) -> None:
        """`ino` lost its last name (in the body of the operation that removed it): free
        it once unused, and list it in this slot's orphan block meanwhile, so it is
        freed even if this node dies first (fs/orphans.py)."""
        self.unlinked.add(ino)
        if self.orphans.add(ino):
            self._dirty(self.orphans)

    async def forget(self, ino: int, count: int) -> None:
        left = self.nlookup.get(ino, 0) - count
        if left > 0:
            self.nlookup[ino] = left
            return
        self.nlookup.pop(ino, None)
        self.handed.pop(ino, None)
        await self._maybe_free(ino)

    # ================================================================ rename
    async def rename(self, p1: int, n1: bytes, p2: int, n2: bytes, flags: int = 0) -> None:
        if len(n2) > NAME_MAX:
            raise FSError(errno.ENAMETOOLONG)
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE) or \
                flags == RENAME_NOREPLACE | RENAME_EXCHANGE:
            raise FSError(errno.EINVAL)
        wanted = [(("rename",), Mode.EX)] if p1 != p2 else []
        while True:
            try:
                dst = await self._rename_once(wanted, p1, n1, p2, n2, flags)
                break
            except _Changed:
                continue                 # a name moved between our looks: again
        if dst is not None and flags != RENAME_EXCHANGE:
            await self._maybe_free(dst)

    async def _rename_once(self, wanted, p1: int, n1: bytes, p2: int, n2: bytes,
                           flags: int) -> int | None:
        async with self.glocks.hold(wanted):
            async with self._hold(pr=sorted({p1, p2}), write=False):
                src = self._find(p1, n1)
                # (a target directory another node removed is ENOENT here: taken for a
                # missing name, the ancestor walk below read its freed inode, found
                # parent 0 and withdrew the node on "metadata block 0")
                dst = self._find_or_none(p2, n2)
                chain = self._ancestors(p2) if p1 != p2 else []

            async def run(alloc):
                inos = sorted({p1, p2, src} | ({dst} if dst else set()))
                async with self._hold(ex=inos, alloc=alloc):
                    self._rename(p1, n1, p2, n2, flags, src, dst, chain)

            await self._retrying(run, p2, 4)
        return dst

    def _ancestors(self, ino: int) -> list[int]:
        """ino and every directory above it (for the moved-into-itself check). Parent
        links change only in cross-directory renames, which hold the cluster-wide rename
        lock (as the caller does) and flush before it goes, so an ancestor this node
        holds no lock on is read from disk and not cached."""
        chain = [ino]
        while ino != self.root and len(chain) < 4096:
            node = self.inodes.get(ino)
            glock = self.glocks.glocks.get(("inode", ino))
            if node is not None and (self.txn.is_dirty(node) or
                                     (glock is not None and glock.lock is not None)):
                ino = node.d.parent
            else:
                try:
                    ino = decode_inode(self.blocks.read_meta(ino), ino).parent
                except (FormatError, StorageError) as exc:
                    raise self._corrupt(exc) from exc
            chain.append(ino)
        return chain

    def _rename(self, p1: int, n1: bytes, p2: int, n2: bytes, flags: int, src: int,
                dst: int | None, chain: list[int]) -> None:
        P1, P2 = self._inode(p1), self._inode(p2)
        assert P1.dir is not None and P2.dir is not None
        if self._entry_ino(P1, n1) != src or self._entry_ino(P2, n2) != dst:
            raise _Changed
        S = self._inode(src, by_name=True)
        if S.dir is not None and src in chain:
            raise FSError(errno.EINVAL, "cannot move a directory into itself")
        if flags & RENAME_NOREPLACE and dst is not None:
            raise FSError(errno.EEXIST)
        if flags & RENAME_EXCHANGE:
            if dst is None:
                raise FSError(errno.ENOENT)
            D = self._inode(dst, by_name=True)
            if D.dir is not None and dst in self._ancestors(p1) and p1 != p2:
                raise FSError(errno.EINVAL)
            self._exchange(P1, n1, S, P2, n2, D)
            return
        if dst == src:
            return
        if dst is not None:
            D = self._inode(dst, by_name=True)
            if S.dir is not None and D.dir is None:
                raise FSError(errno.ENOTDIR)
            if S.dir is None and D.dir is not None:
                raise FSError(errno.EISDIR)
            if D.dir is not None and len(D.dir):
                raise FSError(errno.ENOTEMPTY)
        reserve = self._reserve(p2, 0 if dst is not None else P2.dir.blocks_needed_for_insert())
        if dst is not None:
            P2.dir.replace(n2, src, dtype_of(S.d.mode))
            if D.dir is not None:
                D.d.nlink = 0
                P2.d.nlink -= 1
            else:
                D.d.nlink -= 1
            if D.d.nlink == 0:
                self._orphaned(D.ino)
            D.touch(m=False)
            self._dirty(D)
        else:
            P2.dir.add(n2, src, dtype_of(S.d.mode), self._taker(reserve, p2), self._free_meta)
        self._unreserve(reserve)
        P1.dir.remove(n1)
        if S.dir is not None and p1 != p2:
            P1.d.nlink -= 1
            P2.d.nlink += 1
            S.d.parent = p2
        S.touch(m=False)
        for P in {P1, P2}:
            P.d.size = self._dir_size(P)
            P.touch()
            self._dirty(P)
        self._dirty(S)

    @staticmethod
    def _entry_ino(parent: CachedInode, name: bytes) -> int | None:
        assert parent.dir is not None
        found = parent.dir.get(name)
        return None if found is None else found[0]

    def _exchange(self, P1: CachedInode, n1: bytes, S: CachedInode, P2: CachedInode,
                  n2: bytes, D: CachedInode) -> None:
        assert P1.dir is not None and P2.dir is not None
        P1.dir.replace(n1, D.ino, dtype_of(D.d.mode))
        P2.dir.replace(n2, S.ino, dtype_of(S.d.mode))
        if P1 is not P2:
            for node, old, new in ((S, P1, P2), (D, P2, P1)):
                if node.dir is not None:
                    old.d.nlink -= 1
                    new.d.nlink += 1
                    node.d.parent = new.ino
        for node in {P1, P2, S, D}:
            node.touch(m=node in (P1, P2))
            self._dirty(node)

    # ================================================================ directories
    async def readdir(self, ino: int) -> list[tuple[bytes, int]]:
        async with self._hold(pr=[ino], write=False):
            node = self._inode(ino)
            if node.dir is None:
                raise FSError(errno.ENOTDIR)
            try:
                return [(name, child) for name, (child, _t) in node.dir.items()]
            except FormatError as exc:
                raise self._corrupt(exc) from exc

    async def readlink(self, ino: int) -> bytes:
        async with self._hold(pr=[ino], write=False):
            node = self._inode(ino)
            if not stat.S_ISLNK(node.d.mode):
                raise FSError(errno.EINVAL)
            return bytes(self._read(node, 0, node.d.size))

    # ================================================================ open files
    async def open(self, ino: int) -> CachedInode:
        await self._iopen_hold(ino)
        try:
            async with self._hold(pr=[ino], write=False):
                node = self._inode(ino)
                self.opens[ino] = self.opens.get(ino, 0) + 1
                return node
        except BaseException:
            if not self.opens.get(ino):
                await self._iopen_release(ino)
            raise

    async def release(self, ino: int) -> None:
        left = self.opens.get(ino, 0) - 1
        if left > 0:
            self.opens[ino] = left
            return
        self.opens.pop(ino, None)
        if self.clustered:
            await self._iopen_release(ino)
            await self._reap_if_unlinked(ino)
        else:
            await self._maybe_free(ino)

    # ================================================================ iopen (cluster)
    # A node that has an inode open holds ("iopen", ino) in PR (one lock for all its
    # opens, taken before the inode lock, as everywhere). Whoever drops the last link,
    # or closes last, tries it in EX: granted means no node has it open, so it frees
    # the inode; refused means another node does, and that node's last close (which
    # releases its PR first, then tries) frees it. Two last closers at once cannot both
    # fail: the second try sees no PR left.

    async def _iopen_hold(self, ino: int) -> None:
        if not self.clustered:
            return
        while ino not in self.iopen:
            pending = self._iopen_pending.get(ino)
            if pending is not None:
                await pending.wait()
                continue
            self._iopen_pending[ino] = done = trio.Event()
            try:
                self.iopen[ino] = await self.glocks.locks.lock(("iopen", ino), Mode.PR)
            finally:
                del self._iopen_pending[ino]
                done.set()

    async def _iopen_release(self, ino: int) -> None:
        lock = self.iopen.pop(ino, None)
        if lock is not None:
            await self.glocks.locks.unlock(lock)

    async def _reap_if_unlinked(self, ino: int) -> None:
        """Free `ino` if it has no link left and no node has it open (cluster)."""
        if self.txn.withdrawn or self.opens.get(ino):
            return
        try:
            await self._free_if_unused_anywhere(ino)
        finally:
            self.unlinked.discard(ino)   # freed, or open elsewhere (its last close frees
                                         # it), or not ours to free any more

    async def _free_if_unused_anywhere(self, ino: int) -> str:
        """Free `ino` if it still has no name and no node has it open (iopen EX, tried;
        a one-node mount needs no lock): "freed"; "open" on another node (its last
        close frees it); or "gone" (it has a name, or another node freed it already,
        its block maybe reused)."""
        try:
            async with self._hold(pr=[ino], write=False):
                if self._inode(ino, kernel=False).d.nlink > 0:
                    return "gone"
        except FSError as exc:
            if exc.errno not in (errno.ENOENT, errno.ESTALE):
                raise
            return "gone"
        iopen = None
        if self.clustered:
            try:
                iopen = await self.glocks.locks.lock(("iopen", ino), Mode.EX, try_=True)
            except WouldBlock:
                return "open"
        try:
            return "freed" if await self._free_if_unlinked(ino) else "gone"
        except FSError as exc:
            if exc.errno not in (errno.ENOENT, errno.ESTALE):
                raise
            return "gone"
        finally:
            if iopen is not None:
                with trio.CancelScope(shield=True):
                    await self.glocks.locks.unlock(iopen)

    async def fsync(self, ino: int, datasync: bool = False) -> None:
        """Data is written straight to the device; committing flushes it and the journal.
        fdatasync of a file whose size and block map no commit has yet to cover (an
        overwrite in place) needs only its data on the device and a flush: times may
        wait for the next commit (as fdatasync(2) allows)."""
        self.txn.check_writable()
        node = self.inodes.get(ino)
        if datasync and node is not None and node.synced >= node.meta_version:
            await self.txn.flush_data()
            return
        version = node.meta_version if node is not None else 0
        await self.txn.commit()
        if node is not None:
            node.synced = max(node.synced, version)

    async def read(self, ino: int, off: int, size: int) -> bytes:
        async with self._hold(pr=[ino], write=False,
                              data=self.data_locks(ino, off, size, Mode.PR)):
            node = self._inode(ino)
            try:
                return self._read(node, off, size)
            except StorageError as exc:
                raise FSError(errno.EIO, str(exc)) from exc

    def _read(self, node: CachedInode, off: int, size: int) -> bytes | memoryview:
        """The bytes; a memoryview into a read-ahead buffer is valid only until the next
        device call, i.e. for the reply to this request (see BlockDevice.read_data)."""
        fsize = node.d.size
        if off >= fsize or size <= 0:
            return b""
        size = min(size, fsize - off)
        if node.stuffed:
            return bytes(node.data[off : off + size])
        first, last = off // BLOCK_SIZE, (off + size - 1) // BLOCK_SIZE
        if size >= READAHEAD_TRIGGER:
            # before taking this request's data: the device may hand it out as a view
            # into a read-ahead buffer that must not be refilled until the reply
            self._read_ahead(node, last + 1)
        pieces: list[bytes | memoryview] = []
        for _l, pblk, n in ext.map_range(node.extents, first, last - first + 1):
            if pblk is None:
                pieces.append(bytes(n * BLOCK_SIZE))
            else:
                pieces.append(self.blocks.read_data(pblk, n))
        skip = off - first * BLOCK_SIZE
        data = pieces[0] if len(pieces) == 1 else b"".join(pieces)
        return data[skip : skip + size] if skip or len(data) != size else data

    def _read_ahead(self, node: CachedInode, lblk: int) -> None:
        """Sequential reader: ask the device to start reading what follows
        (asynchronously), so the next requests find it cached. `read_ahead_done` is
        the logical block up to which read-ahead was asked; only the new part of the
        window is advised, in READAHEAD_STEP steps."""
        done = node.read_ahead_done
        if done - lblk > READAHEAD_BLOCKS or done < lblk:
            done = lblk                  # the reader jumped: restart the window here
        elif done - lblk > READAHEAD_BLOCKS - READAHEAD_STEP:
            return                       # still far enough ahead
        end = lblk + READAHEAD_BLOCKS
        for _l, pblk, n in ext.map_range(node.extents, done, end - done):
            if pblk is not None:
                self.blocks.advise_willneed(pblk, n)
        node.read_ahead_done = end

    async def write(self, ino: int, off: int, data: bytes) -> int:
        if off + len(data) > (1 << 63) - 1:
            raise FSError(errno.EFBIG)

        async def run(alloc):
            # extent blocks may be given back when extents merge
            async with self._hold(ex=[ino], alloc=alloc,
                                  frees=lambda: self._inode(ino).ext_blocks):
                node = self._inode(ino)
                self._write(node, off, data)
                return len(data)

        if not self.blocks.write_room(len(data)):
            # the write-behind queue is full: wait in a worker thread, not in the loop
            await trio.to_thread.run_sync(self.blocks.wait_write_room, len(data))
        if self.clustered and await self._overwrite_in_place(ino, off, data):
            return len(data)
        node = self.inodes.get(ino)
        goal = ino
        if node is not None and node.extents:
            goal = node.extents[-1].pblk + node.extents[-1].count
        return await self._retrying(run, goal, len(data) // BLOCK_SIZE + 2)

    async def _overwrite_in_place(self, ino: int, off: int, data: bytes) -> bool:
        """A cluster's overwrite of blocks the file already has, inside its size, with
        recent times: under the inode's lock in PR and the data chunks' in EX, so
        another node writing other chunks of the file (or reading its attributes)
        goes on at the same time. False, having changed nothing, when the write
        needs more (blocks, size or times: then it takes the inode in EX)."""
        cached = self.inodes.get(ino)
        if cached is not None and not self._fits_in_place(cached, off, len(data)):
            return False                 # (a copy cached under no lock: only a guess)
        async with self._hold(pr=[ino], write=False,
                              data=self.data_locks(ino, off, len(data), Mode.EX)):
            self.txn.check_writable()
            node = self._inode(ino)
            if not self._fits_in_place(node, off, len(data)):
                return False
            first, last = off // BLOCK_SIZE, (off + len(data) - 1) // BLOCK_SIZE
            runs = ext.map_range(node.extents, first, last - first + 1)
            buf = self._assemble(node, off, data, first, last, runs)
            for lblk, pblk, n in runs:
                pos = (lblk - first) * BLOCK_SIZE
                self._write_data(pblk, buf[pos : pos + n * BLOCK_SIZE])
            return True

    @staticmethod
    def _fits_in_place(node: CachedInode, off: int, size: int) -> bool:
        """Whether a write of `size` bytes at `off` changes nothing but data: a regular
        file's existing blocks below its size, its times recent enough to stand."""
        d = node.d
        if not stat.S_ISREG(d.mode) or node.stuffed or not size or off + size > d.size:
            return False
        now = time.time_ns()
        for secs, nsecs in ((d.mtime, d.mtime_ns), (d.ctime, d.ctime_ns)):
            if not 0 <= now - (secs * 1_000_000_000 + nsecs) < WRITE_TIMES_SLACK_NS:
                return False
        first, last = off // BLOCK_SIZE, (off + size - 1) // BLOCK_SIZE
        return all(pblk is not None for _l, pblk, _n in
                   ext.map_range(node.extents, first, last - first + 1))

    def _write(self, node: CachedInode, off: int, data: bytes | memoryview) -> None:
        end = off + len(data)
        if not data:
            return
        if node.stuffed and end <= PAYLOAD_MAX:
            if len(node.data) < off:
                node.data.extend(bytes(off - len(node.data)))
            node.data[off:end] = data
            node.d.size = max(node.d.size, end)
            node.meta_version += 1          # the data itself lives in the inode block
            node.touch()
            self._dirty(node)
            return
        first, last = off // BLOCK_SIZE, (end - 1) // BLOCK_SIZE
        old = bytes(node.data) if node.stuffed else b""
        runs = ext.map_range(node.extents, first, last - first + 1)
        holes = sum(n for _l, p, n in runs if p is None)
        unstuff = 1 if (node.stuffed and old) else 0
        goal = node.extents[-1].pblk + node.extents[-1].count if node.extents else node.ino
        new_runs = self._reserve_runs(goal, holes + unstuff)
        if holes or unstuff or end > node.d.size:
            node.meta_version += 1          # block map or size: a datasync must commit
        if holes or unstuff:
            self.txn.fresh_data = True      # that commit must flush the data first
        meta = self._reserve(goal, 2) if len(node.extents) + len(new_runs) > \
            fext.INLINE_EXTENTS else []
        # -- no failure past this point except I/O
        if node.stuffed:
            node.set_map_kind(F_EXTENTS)
            node.data = bytearray()
            if unstuff:
                pblk, _n = self._take_run(new_runs, 1)
                self.blocks.write_data_now(pblk, old.ljust(BLOCK_SIZE, b"\0"))
                ext.insert(node.extents, fext.Extent(0, pblk, 1))
                if first == 0:
                    runs = ext.map_range(node.extents, first, last - first + 1)
        buf = self._assemble(node, off, data, first, last, runs)
        for lblk, pblk, n in runs:
            pos = (lblk - first) * BLOCK_SIZE
            if pblk is not None:
                self._write_data(pblk, buf[pos : pos + n * BLOCK_SIZE])
                continue
            done = 0
            while done < n:
                pstart, got = self._take_run(new_runs, n - done)
                chunk = buf[pos + done * BLOCK_SIZE : pos + (done + got) * BLOCK_SIZE]
                self._write_data(pstart, chunk)
                ext.insert(node.extents, fext.Extent(lblk + done, pstart, got))
                done += got
        self._unreserve([b for s, c in new_runs for b in range(s, s + c)])
        self._fit_extent_blocks(node, meta)
        node.d.size = max(node.d.size, end)
        node.touch()
        self._dirty(node)

    def _write_data(self, pblk: int, chunk: memoryview) -> None:
        """File data straight to its blocks, queued to the device's write-behind thread:
        the request is answered while the copy is made (the journal commit waits for
        the queue before it flushes, so data still precedes the metadata that points
        at it, and fsync still makes it durable)."""
        self.blocks.write_data(pblk, chunk)

    def _assemble(self, node: CachedInode, off: int, data: bytes | memoryview, first: int,
                  last: int, runs: list) -> memoryview:
        """Whole blocks covering the write: existing bytes around it, zeros in holes."""
        start = first * BLOCK_SIZE
        if off == start and len(data) % BLOCK_SIZE == 0:
            return memoryview(data)
        buf = bytearray((last - first + 1) * BLOCK_SIZE)
        mapped = {lblk: (pblk, n) for lblk, pblk, n in runs if pblk is not None}
        for edge in {first, last}:
            for lblk, (pblk, n) in mapped.items():
                if lblk <= edge < lblk + n:
                    at = (edge - first) * BLOCK_SIZE
                    buf[at : at + BLOCK_SIZE] = self.blocks.read_data_block(pblk + edge - lblk)
        buf[off - start : off - start + len(data)] = data
        return memoryview(buf)

    def _reserve_runs(self, goal: int, count: int) -> list[tuple[int, int]]:
        runs: list[tuple[int, int]] = []
        try:
            while count > 0:
                start, n = self.alloc.allocate(goal, count, self._dirty)
                runs.append((start, n))
                goal, count = start + n, count - n
        except FSError:
            self._unreserve([b for s, c in runs for b in range(s, s + c)])
            raise
        return runs

    @staticmethod
    def _take_run(runs: list[tuple[int, int]], want: int) -> tuple[int, int]:
        start, n = runs[0]
        got = min(n, want)
        if got == n:
            runs.pop(0)
        else:
            runs[0] = (start + got, n - got)
        return start, got

    def _fit_extent_blocks(self, node: CachedInode, spare: list[int]) -> None:
        """Give the extent list as many extent blocks as it needs, no more."""
        need = node.extent_blocks_needed()
        if need > fext.MAX_EXTENT_BLOCKS:
            self._unreserve(spare)
            raise FSError(errno.EFBIG, "file too fragmented")
        while len(node.ext_blocks) < need:
            node.ext_blocks.append(spare.pop() if spare else self._reserve(node.ino, 1)[0])
        while len(node.ext_blocks) > need:
            self._release(node.ext_blocks.pop(), 1)
        self._unreserve(spare)

    async def truncate(self, ino: int, size: int) -> None:
        async def run(alloc):
            async with self._hold(ex=[ino], alloc=alloc,
                                  frees=lambda: self._tail_blocks(ino, size)):
                self._truncate(self._inode(ino), size)

        await self._retrying(run, ino, 4)

    def _tail_blocks(self, ino: int, size: int) -> list[int]:
        node = self._inode(ino)
        keep = -(-size // BLOCK_SIZE)
        return [e.pblk for e in node.extents if e.lend > keep] + node.ext_blocks

    def _truncate(self, node: CachedInode, size: int) -> None:
        if node.dir is not None:
            raise FSError(errno.EISDIR)
        node.meta_version += 1
        if node.stuffed:
            if size <= PAYLOAD_MAX:
                node.data = node.data[:size].ljust(size, b"\0")
                node.d.size = size
                node.touch()
                self._dirty(node)
                return
            data = bytes(node.data)
            node.data = bytearray()
            node.set_map_kind(F_EXTENTS)
            node.d.size = 0
            if data:
                self._write(node, 0, data)
        keep = -(-size // BLOCK_SIZE)
        if size < node.d.size:
            for pblk, n in ext.truncate(node.extents, keep):
                self._release(pblk, n)
            if size % BLOCK_SIZE:
                tail = ext.map_range(node.extents, size // BLOCK_SIZE, 1)[0]
                if tail[1] is not None:
                    cut = size % BLOCK_SIZE
                    self.blocks.zero_data(tail[1], cut)
            self._fit_extent_blocks(node, [])
        node.d.size = size
        node.touch()
        self._dirty(node)

    # ================================================================ xattrs
    async def getxattr(self, ino: int, name: bytes) -> bytes:
        async with self._hold(pr=[ino], write=False):
            value = self._inode(ino).d.xattrs.get(name)
            if value is None:
                raise FSError(errno.ENODATA)
            return value

    async def listxattr(self, ino: int, privileged: bool = True) -> list[bytes]:
        """Names; trusted.* only for a privileged caller (as Linux does)."""
        async with self._hold(pr=[ino], write=False):
            names = list(self._inode(ino).d.xattrs)
        return names if privileged else [n for n in names if not n.startswith(b"trusted.")]

    async def setxattr(self, ino: int, name: bytes, value: bytes) -> None:
        if not name.startswith(XATTR_NAMESPACES):
            raise FSError(errno.ENOTSUP)
        if len(name) > 255 or len(value) > 65536:
            raise FSError(errno.ERANGE)

        def frees() -> list[int]:
            blk = self._inode(ino).d.xattr_blk
            return [blk] if blk else []

        async def run(alloc):
            async with self._hold(ex=[ino], alloc=alloc, frees=frees):
                node = self._inode(ino)
                new = dict(node.d.xattrs)
                new[name] = value
                self._store_xattrs(node, new)

        await self._retrying(run, ino, 1)

    async def removexattr(self, ino: int, name: bytes) -> None:
        def frees() -> list[int]:
            blk = self._inode(ino).d.xattr_blk
            return [blk] if blk else []

        async with self._hold(ex=[ino], frees=frees):
            node = self._inode(ino)
            if name not in node.d.xattrs:
                raise FSError(errno.ENODATA)
            new = dict(node.d.xattrs)
            del new[name]
            self._store_xattrs(node, new)

    def _store_xattrs(self, node: CachedInode, xattrs: dict[bytes, bytes]) -> None:
        size = len(encode_xattrs(xattrs))
        if size > XATTR_BLOCK_MAX:
            raise FSError(errno.ENOSPC, "xattrs do not fit in one block")
        old = node.d.xattrs
        node.d.xattrs = xattrs
        if node.xattrs_fit_inline():
            if node.d.xattr_blk:
                self._release(node.d.xattr_blk, 1)
                node.d.xattr_blk = 0
        elif not node.d.xattr_blk:
            try:
                node.d.xattr_blk = self._reserve(node.ino, 1)[0]
            except FSError:
                node.d.xattrs = old
                raise
        node.touch(m=False)
        self._dirty(node)

    # ================================================================ orphans
    def _load_orphans(self, slot: int) -> OrphanList:
        blkno = self.sb.orphan_location(slot)
        try:
            return OrphanList.decode(self.blocks.read_meta(blkno), blkno)
        except (FormatError, StorageError) as exc:
            raise FormatError(f"journal slot {slot}: {exc} (fsck --repair rewrites it)"
                              ) from exc

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
        for slot in range(self.sb.journal_count):
            if slot == self.slot or self.closing:
                continue
            try:
                if not self._load_orphans(slot).inodes:
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
        theirs = self._load_orphans(slot)
        if not theirs.inodes:
            return 0
        left_out = self.orphans.update(sorted(theirs.inodes))
        emptied = OrphanList(theirs.blkno, [])
        # both blocks in one transaction, written home before the slot's lock goes (a
        # node that claims the slot next must read it empty; and our journal must
        # never hold a block another node may write later)
        self._dirty(self.orphans)
        self._dirty(emptied)
        await self.txn.commit(checkpoint=True)
        log.info("adopted %d orphan inodes of journal slot %d%s", len(theirs),
                 slot, f" ({len(left_out)} did not fit: fsck --repair frees them)"
                 if left_out else "")
        return len(theirs)

    async def sweep_orphans(self) -> int:
        """Free each listed inode that still has no name and that no node has open;
        drop entries whose inode another node freed meanwhile. The freed count."""
        freed = 0
        for ino in sorted(self.orphans.inodes):
            if self.closing or self.txn.withdrawn is not None:
                break
            if ino in self.unlinked:
                continue                 # unlinked in this life: the usual path frees it
            freed += await self._sweep_one(ino)
        return freed

    async def _sweep_one(self, ino: int) -> int:
        outcome = await self._free_if_unused_anywhere(ino)
        if outcome == "gone":            # (freed with its entry otherwise)
            async with self._hold():
                if self.orphans.discard(ino):
                    self._dirty(self.orphans)
        if outcome != "freed":
            return 0
        log.info("freed orphan inode %d (unlinked while open, its opener gone)", ino)
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
                self._load_group_hints()
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

    # ================================================================ lock demotion
    async def _flush_for_demote(self, covered: Covered | None = None) -> None:
        """Before a lock goes down: commit, and write home what it covers (`covered`,
        with a revoke record for those blocks; everything, emptying the journal, when
        None). So no replay of our journal puts a block whose lock this node gave up
        over a newer copy (the no-stale-replay rule, docs/journal.md), and the disk
        holds the newest copy of everything the next holder will read."""
        if not self.txn.withdrawn:
            await self.txn.flush_for_demote(covered)
        elif self.clustered:
            # what we committed may not be home: never hand it over stale; the mount
            # leaves the cluster as failed and the others replay our journal
            await trio.sleep_forever()

    def _nothing_to_flush(self, glock: Glock) -> bool:
        """May this glock go down without a journal flush (to another node, or out of
        the lock cache)? A data chunk always (its demote only drains queued writes).
        An inode if no change to it is
        dirty, being committed or logged and not yet home: then the disk holds the
        newest copy of everything its lock covers, and our journal no copy a replay
        could put over a newer one (docs/journal.md). Under a busy node the journal
        is seldom empty; this lets its idle inodes go without emptying it each time,
        to its lock cache or to another node."""
        if glock.name[0] != "inode":
            return glock.name[0] == "data"
        ino = glock.name[1]
        if self.txn.committing():
            return False                 # (the journal's state is moving: flush as before)
        node = self.inodes.get(ino)
        if node is None:
            # (freed here: its tombstone may be dirty, with no cached inode to say so)
            return ino not in self.freed and not self.blocks.logged(ino)
        return not self.txn.is_dirty(node) and \
            not any(self.blocks.logged(blkno) for blkno in node.meta_blocks())

    async def _demote_inode(self, glock: Glock, target: Mode) -> None:
        """Another node wants this inode (or the lock cache lets it go): flush;
        going to nothing, also drop our copy (open or not: per-open state lives in
        self.opens) and tell the kernel. An inode with nothing of it dirty or in the
        journal needs no flush, only queued data writes on the device
        (_nothing_to_flush): a busy node does not write its whole journal home because
        another node reads one of its older files."""
        ino = glock.name[1]
        if self._nothing_to_flush(glock) and self.txn.withdrawn is None:
            await self.txn.drain_data()
        else:
            await self._flush_for_demote(self._covered_by(ino))
            self._unguarded.pop(ino, None)
        if target != Mode.NL:
            return                       # PR: our clean copy stays valid
        self.inodes.drop_if_clean(ino)   # (dirty now: created during the flush)
        self.blocks.forget_read_ahead()  # chunks of its data may be rewritten elsewhere
        if self.names_hook is not None:  # the other node may rename what is in it
            self.names_hook(ino)
        await self.kernel_forget.forget(ino)

    def _covered_by(self, ino: int) -> Covered:
        """What inode `ino`'s lock covers, asked once its flush has committed: every
        metadata block of the cached inode, and the inode block of each inode created
        in it (a directory) whose own lock is not held yet. None (write everything
        home) when the inode is not cached or was freed here: then which of its blocks
        may be in the journal is not known."""
        def blocks() -> list[int] | None:
            node = self.inodes.get(ino)
            if node is None or ino in self.freed:
                return None
            return node.meta_blocks() + list(self._unguarded.get(ino, ()))
        return blocks

    async def _demote_data(self, glock: Glock, target: Mode) -> None:
        """Another node wants a chunk of a file's data: our queued writes there must be
        on the device before it reads or writes it; going to nothing (it will write),
        what we read ahead may be stale. The data lock covers no metadata: an
        overwrite in place changed none, so there is nothing to commit."""
        if self.txn.withdrawn is not None:
            await self._flush_for_demote()   # never hands a lock over (see there)
            return
        await self.txn.drain_data()
        if target == Mode.NL:
            self.blocks.forget_read_ahead()

    async def _demote_rgrp(self, glock: Glock, target: Mode) -> None:
        """Flush, leave the group's free count in the lock value block, drop the group."""
        await self._flush_for_demote()
        index = glock.name[1]
        self._leave_free_count(glock)
        if target == Mode.NL:
            self.alloc.drop(index)

    def _leave_free_count(self, glock: Glock) -> None:
        """Before an EX lock on a group goes down: its free count into the lock value
        block, for the next holder and every statfs (stored only from EX)."""
        group = self.alloc.groups.get(glock.name[1])
        if group is not None and glock.lock is not None and glock.lock.mode == Mode.EX:
            glock.lock.lvb = encode_free_lvb(group.free + group.quarantined)

    async def _demote_flush(self, glock: Glock, target: Mode) -> None:
        """The rename lock covers no cached object, only the order of directory moves:
        what the moves changed must be home before another node moves directories."""
        await self._flush_for_demote()

