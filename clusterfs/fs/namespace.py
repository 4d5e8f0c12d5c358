"""Namespace: creating (files, directories, symlinks, device nodes), linking,
unlinking and removing (an inode is freed once its last link and its last opener
anywhere are gone), renaming (over targets, across directories under the
cluster-wide rename lock, RENAME_EXCHANGE / RENAME_NOREPLACE), listing and
reading symlinks.

A mixin of FileSystem (fs/filesystem.py), split out by noun: its methods use the
filesystem's state and plumbing (`_hold`, `_inode`, `txn`, `glocks`, ...).
"""

from __future__ import annotations

import errno
import itertools
import stat
import time
from collections.abc import Sequence

from clusterfs.cache.glock import Glock
from clusterfs.dlm.interface import Mode
from clusterfs.errors import FormatError, FSError, StorageError
from clusterfs.format.block import BLOCK_SIZE
from clusterfs.format.directory import NAME_MAX
from clusterfs.format.inode import (
    F_STUFFED,
    Inode,
    decode_inode,
    encode_inode,
)
from clusterfs.fs.directory import Directory
from clusterfs.fs.inode import CachedInode

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
SYMLINK_MAX = 4095


def dtype_of(mode: int) -> int:
    return stat.S_IFMT(mode) >> 12


class _Tombstone:
    """What a freed inode's block says until it is reused: mode 0, nlink 0. Another node
    (or this one's kernel) that still names the inode reads it as gone (ENOENT)."""

    def __init__(self, ino: int) -> None:
        self.ino = ino

    def block_estimate(self) -> int:
        return 1

    def to_blocks(self) -> dict[int, bytes]:
        return {self.ino: bytes(encode_inode(Inode(ino=self.ino, mode=0, nlink=0, blocks=0)))}


# A node keeps at most this many inodes it made with no lock of their own (about 2 KiB
# each, with their directory's growth); past it the oldest UNGUARD_BATCH take theirs.
UNGUARDED_MAX = 50_000
UNGUARD_BATCH = 1024


class _Changed(Exception):
    """A name moved between an operation's look under PR and its change under EX."""


class Namespace:
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
            async with self._hold(ex=[parent], alloc=alloc, names=[(parent, name)]):
                node = self._create(parent, name, mode, rdev, uid, gid, target)
                if open_it:
                    # counted open in the body that made it: the directory's lock may
                    # start going down as soon as the body ends (this create's commit
                    # may still wait), and its demote takes the iopen lock owed before
                    # another node can reach the file. Counted after that await, a
                    # demote under way had settled nothing and let the file go with no
                    # iopen lock: another node's unlink freed it under the open file.
                    self.opens[node.ino] = self.opens.get(node.ino, 0) + 1
                    if self.clustered:
                        self._iopen_owed.add(node.ino)
                return node

        node = await self._retrying(run, self._create_goal(parent), 8)
        # (cluster: no lock of its own yet; the directory's covers it, _unguarded)
        if len(self._unguarded_in) > self.unguarded_max:
            await self._guard_oldest()
        self.count_lookup(node.ino, node.d.generation)
        return node

    async def _guard(self, ex: list[int], pr: list[int]) -> None:
        """(An operation now holds these inodes' own locks.) Those made here unguarded
        are covered by their own locks from now on, not by their directory's: a lock
        that can go without the directory's, so an iopen owed is taken first."""
        for ino in (*ex, *pr):
            parent = self._unguarded_in.get(ino)
            if parent is None:
                continue
            await self._settle_iopen(ino)          # (returns at once when none is owed)
            self._guarded(parent, ino)

    async def _guard_oldest(self) -> None:
        """Past `unguarded_max` inodes made here with no lock of their own (a long burst
        of creates with no directory lock going), take the own locks of the oldest
        batch: kept that way, their objects are bounded by the lock cache (its
        shrinker), as every other inode's are, and no longer by the directory's lock
        alone."""
        oldest = sorted(itertools.islice(self._unguarded_in, UNGUARD_BATCH))
        async with self._hold(ex=oldest, write=False):
            pass                                   # (_Hold moves them: _guard)

    def _guarded(self, parent: int, ino: int) -> None:
        """`ino`'s own lock is held now (or its directory's lock went and took it
        along): the directory's lock no longer covers its block (and a directory
        created in for good leaves no empty set behind)."""
        self._unguarded_in.pop(ino, None)
        unguarded = self._unguarded.get(parent)
        if unguarded is not None:
            unguarded.discard(ino)
            if not unguarded:
                del self._unguarded[parent]

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
        if target:
            try:                            # stuffed when short, a data block when long:
                self._write(node, 0, target)    # its ENOSPC changes nothing
            except FSError:                 # (they stayed taken: fsck's "leaked")
                self._unreserve([ino, *reserve])
                raise
        self.inodes.put(ino, node)
        if self.clustered:
            self._unguarded.setdefault(parent, set()).add(ino)
            self._unguarded_in[ino] = parent
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
        return self._home_start()

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
            async with self._hold(ex=sorted({ino, parent}), alloc=alloc,
                                  names=[(parent, name)]):
                node = self._inode(ino)
                if node.dir is not None:
                    raise FSError(errno.EPERM, "hard link to a directory")
                p = self._inode(parent)
                if p.dir is None:
                    raise FSError(errno.ENOTDIR)
                if p.d.nlink == 0:
                    raise FSError(errno.ENOENT, "directory was removed")  # (_rename)
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
            async with self._hold(pr=[parent], write=False, names=[(parent, name)]):
                ino = self._find(parent, name)
            # the victim's lock is taken with the parent's, in order; if the name
            # moved meanwhile (another node, or another request here), look again
            async with self._hold(ex=sorted({parent, ino}),
                                  names=[(parent, name), (ino, None)] if want_dir
                                  else [(parent, name)]):
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
            self._orphan_room()
        self.txn.discard(node)
        self.txn.add(_Tombstone(node.ino))   # so a node still naming it sees it is gone
        self.inodes.discard(node.ino)
        if not self.nlookup.pop(node.ino, 0):
            self.handed.pop(node.ino, None)
        # (else the kernel still holds lookups of the number: a cluster frees at once,
        # the iopen lock deciding, and the FORGET comes later. The generation handed
        # out stays until then, so once another node puts a new inode in the block the
        # kernel's number is stale there (_inode), not a name for that inode)
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
            async with self._hold(pr=sorted({p1, p2}), write=False,
                                  names=[(p1, n1), (p2, n2)]):
                src = self._find(p1, n1)
                # (a target directory another node removed is ENOENT here: taken for a
                # missing name, the ancestor walk below read its freed inode, found
                # parent 0 and withdrew the node on "metadata block 0")
                dst = self._find_or_none(p2, n2)
            # (under the rename lock still: no parent link changes meanwhile)
            chain = await self._ancestors(p2) if p1 != p2 else []
            chain1 = await self._ancestors(p1) if p1 != p2 and \
                flags == RENAME_EXCHANGE else []

            async def run(alloc):
                inos = sorted({p1, p2, src} | ({dst} if dst else set()))
                async with self._hold(ex=inos, alloc=alloc, names=[(p1, n1), (p2, n2)]):
                    self._rename(p1, n1, p2, n2, flags, src, dst, chain, chain1)

            await self._retrying(run, p2, 4)
        return dst

    async def _ancestors(self, ino: int) -> list[int]:
        """ino and every directory above it (for the moved-into-itself check), called
        just after the rename's look under PR. Parent links change only in
        cross-directory renames, which hold the cluster-wide rename lock (as the caller
        does) and flush before it goes (and the kernel makes one mount's
        cross-directory renames wait for each other), so an ancestor this node holds no
        lock on is read from disk, with the event loop free, and not cached. What else
        may change meanwhile is `ino` itself: once its lock went, another node may have
        removed it (an empty directory), and then its parent: so the walk counts only
        if this node held `ino`'s lock from before the walk to its end (else _Changed:
        the rename looks again)."""
        if ino == self.root:
            return [ino]
        mark = self._lock_mark(ino)
        if mark is None:
            raise _Changed               # let go since the look
        chain = [ino]
        at = ino
        try:
            while at != self.root and len(chain) < 4096:
                node = self.inodes.get(at)
                if node is not None and (self.txn.is_dirty(node) or self._held(at)):
                    at = node.d.parent
                else:
                    read = self._reader(await self._read_blocks_async([at]))
                    at = decode_inode(read(at), at).parent
                chain.append(at)
        except (FormatError, StorageError) as exc:
            if not self._still_held(ino, mark):
                raise _Changed from exc  # (removed meanwhile: not corruption)
            raise self._corrupt(exc) from exc
        if not self._still_held(ino, mark):
            raise _Changed
        return chain

    def _lock_mark(self, ino: int) -> tuple[Glock, int] | None:
        """Inode `ino`'s glock as held now (and its demote count), or None if not held."""
        glock = self.glocks.glocks.get(("inode", ino))
        if glock is None or glock.lock is None:
            return None
        return glock, glock.demotes

    def _still_held(self, ino: int, mark: tuple[Glock, int]) -> bool:
        """Whether `ino`'s glock has been held without a demote since `mark`."""
        glock, demotes = mark
        return self.glocks.glocks.get(("inode", ino)) is glock and \
            glock.lock is not None and glock.demotes == demotes

    def _rename(self, p1: int, n1: bytes, p2: int, n2: bytes, flags: int, src: int,
                dst: int | None, chain: list[int], chain1: list[int]) -> None:
        """(chain, chain1: p2's and, for an exchange, p1's ancestors, _ancestors)"""
        P1, P2 = self._inode(p1), self._inode(p2)
        if P1.dir is None or P2.dir is None:
            # removed since the look under PR, and the block holds another inode now
            # (one made here, whose generation the caller's number cannot be told
            # from): look again; the look says what the number names now (ENOTDIR)
            raise _Changed
        if P2.d.nlink == 0:
            # removed by another node, not freed yet (still open somewhere): this
            # node's kernel cannot know (its VFS refuses only its own removed
            # directories), and an entry made here would go with the directory
            raise FSError(errno.ENOENT, "target directory was removed")
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
            if D.dir is not None and dst in chain1 and p1 != p2:
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
        return [(name, child) for name, child, _t in await self.listing(ino)]

    async def listing(self, ino: int) -> list[tuple[bytes, int, int]]:
        """Every entry of directory `ino`: (name, inode, type as S_IFMT(mode) >> 12)."""
        async with self._hold(pr=[ino], write=False, names=[(ino, None)]):
            node = self._inode(ino)
            if node.dir is None:
                raise FSError(errno.ENOTDIR)
            try:
                return [(name, child, dtype) for name, (child, dtype) in node.dir.items()]
            except FormatError as exc:
                raise self._corrupt(exc) from exc

    async def still_listed(self, parent: int, entries: Sequence[tuple[bytes, int]]
                           ) -> list[bool]:
        """Whether each (name, inode) of a listing taken earlier still stands in
        `parent`, under the directory's lock alone: no entry's inode is locked or read
        (a cluster's readdir hands the kernel names alone, fuse/operations.py)."""
        async with self._hold(pr=[parent], write=False, names=[(parent, None)]):
            return [self._still_names(parent, name, ino) for name, ino in entries]

    def _still_names(self, parent: int, name: bytes, ino: int) -> bool:
        try:
            return self._find_or_none(parent, name) == ino
        except FSError:
            return False                 # (corrupt: withdrawn, said so)

    async def readlink(self, ino: int) -> bytes:
        async with self._hold(pr=[ino], write=False):
            node = self._inode(ino)
            if not stat.S_ISLNK(node.d.mode):
                raise FSError(errno.EINVAL)
            return bytes(await self._read(node, 0, node.d.size))
