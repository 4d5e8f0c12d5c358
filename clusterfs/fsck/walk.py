"""Passes 3 and 4: the walk from the root, then parents and link counts.

Breadth first over directories. Each entry must point into a group's data
area at a block that decodes as an inode (checksum, type, own address) of the
type the entry says. A non-directory may be reached many times (hard links);
a directory only once, and its `parent` field must name the directory holding
its entry. Link counts: a file's nlink is the number of entries naming it; a
directory's is 2 + its subdirectories (the root counts as its own parent).
"""

from __future__ import annotations

import stat
from collections import deque
from dataclasses import dataclass

from clusterfs.errors import ClusterFSError
from clusterfs.format import directory as fmt
from clusterfs.format.inode import Inode, decode_inode
from clusterfs.fsck.context import Context
from clusterfs.fsck.directory import DirContents
from clusterfs.fsck.inodes import check_inode

PROGRESS_EVERY = 20_000


@dataclass
class Seen:
    mode: int
    nlink: int
    parent: int            # the inode's parent field (directories)
    refs: int = 0          # directory entries naming it
    subdirs: int = 0
    referrers: list[int] | None = None   # directories: those holding an entry for it


class Walker:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.seen: dict[int, Seen] = {}
        self.bad: dict[int, str] = {}                 # entry targets that are not inodes
        self.dirs: dict[int, DirContents] = {}
        self.queue: deque[int] = deque()

    @property
    def directories(self) -> int:
        return sum(1 for s in self.seen.values() if stat.S_ISDIR(s.mode))

    # -- pass 3 ---------------------------------------------------------------------
    def walk(self) -> None:
        root = self.ctx.sb.root_ino
        inode = self._load_root(root)
        if inode is None:
            return
        self.queue.append(root)
        while self.queue:
            d = self.queue.popleft()
            for e in self.dirs.pop(d).entries:
                self._follow(d, e)

    def _load_root(self, root: int) -> Inode | None:
        why = self.ctx.placement_problem(root, 1)
        inode = None
        if why is None:
            try:
                inode = decode_inode(self.ctx.reader.read(root), root)
            except ClusterFSError as exc:
                why = str(exc)
        if inode is not None and not stat.S_ISDIR(inode.mode):
            why = f"not a directory (mode {inode.mode:#o})"
        if why is not None:
            self.ctx.report.error(f"root inode {root}", f"{why}; nothing can be walked")
            self.ctx.incomplete = True
            return None
        self.ctx.claim(root, 1, root, "inode")
        self._admit(inode)
        if inode.parent != root:
            p = self.ctx.report.error(f"inode {root}", f"root's parent field is "
                                                       f"{inode.parent}, not itself",
                                      fixable=True)
            self.ctx.fix_inode(root, "parent", root, p)
        return inode

    def _follow(self, d: int, e: fmt.DirEntry) -> None:
        where = f"directory {d}"
        label = f"entry {e.name!r} -> {e.ino}"
        why = self.ctx.placement_problem(e.ino, 1)
        if why is not None:
            self.ctx.report.error(where, f"{label}: {why}")
            return
        seen = self.seen.get(e.ino)
        if seen is not None:
            self._again(d, e, seen)
            return
        if e.ino in self.bad:
            self.ctx.report.error(where, f"{label}: {self.bad[e.ino]}")
            return
        inode = self._load(e.ino)
        if inode is None:
            self.ctx.report.error(where, f"{label}: {self.bad[e.ino]}")
            return
        why = self.ctx.claim(e.ino, 1, e.ino, "inode")
        if why is not None:
            self.ctx.report.error(where, f"{label}: {why}")
        self._check_dtype(d, e, inode.mode)
        seen = self._admit(inode)
        seen.refs = 1
        if stat.S_ISDIR(inode.mode):
            self.seen[d].subdirs += 1
            seen.referrers = [d]

    def _again(self, d: int, e: fmt.DirEntry, seen: Seen) -> None:
        if stat.S_ISDIR(seen.mode):
            if seen.referrers is None:      # the root
                self.ctx.report.error(f"directory {d}", f"entry {e.name!r} links the root")
            else:
                seen.referrers.append(d)
            return
        seen.refs += 1
        self._check_dtype(d, e, seen.mode)

    def _check_dtype(self, d: int, e: fmt.DirEntry, mode: int) -> None:
        if e.dtype != stat.S_IFMT(mode) >> 12:
            self.ctx.report.error(f"directory {d}", f"entry {e.name!r} has type {e.dtype}, "
                                                    f"inode {e.ino} is type "
                                                    f"{stat.S_IFMT(mode) >> 12}")

    def _load(self, ino: int) -> Inode | None:
        try:
            return decode_inode(self.ctx.reader.read(ino), ino)
        except ClusterFSError as exc:
            self.bad[ino] = f"not a valid inode ({exc}; {self.ctx.bitmap_says(ino)})"
            self.ctx.incomplete = True   # whatever it owned is no longer reachable
            return None

    def _admit(self, inode: Inode) -> Seen:
        """Check an inode met for the first time and remember what links need."""
        checked = check_inode(self.ctx, inode)
        root = inode.ino == self.ctx.sb.root_ino
        seen = Seen(inode.mode, inode.nlink, inode.parent)
        self.seen[inode.ino] = seen
        if checked.directory is not None:
            self.dirs[inode.ino] = checked.directory
            if not root:
                self.queue.append(inode.ino)
        if len(self.seen) % PROGRESS_EVERY == 0:
            self.ctx.report.progress(f"  ... {len(self.seen)} inodes")
        return seen

    # -- pass 4 ---------------------------------------------------------------------
    def check_parents(self) -> None:
        """A directory is linked from exactly one directory, which its parent field names.
        Judged after the walk, so the order entries were met in does not matter."""
        for ino, s in self.seen.items():
            if s.referrers is None:
                continue
            if len(s.referrers) > 1:
                names = ", ".join(map(str, s.referrers))
                self.ctx.report.error(f"directory {ino}", f"reachable twice: entries in "
                                                          f"directories {names} (parent "
                                                          f"field says {s.parent})")
            elif s.parent != s.referrers[0]:
                p = self.ctx.report.error(f"inode {ino}", f"directory's parent field is "
                                                          f"{s.parent}, but its entry is in "
                                                          f"directory {s.referrers[0]}",
                                          fixable=True)
                self.ctx.fix_inode(ino, "parent", s.referrers[0], p)

    def check_links(self) -> None:
        for ino, s in self.seen.items():
            if stat.S_ISDIR(s.mode):
                want = 2 + s.subdirs
                why = f"link count {s.nlink}, expected {want} (2 + {s.subdirs} subdirectories)"
            else:
                want = s.refs
                entries = "directory entry" if s.refs == 1 else "directory entries"
                why = f"link count {s.nlink}, {s.refs} {entries}"
            if s.nlink == want:
                continue
            # with part of the tree unreadable the counts above may be short
            p = self.ctx.report.error(f"inode {ino}", why, fixable=not self.ctx.incomplete)
            if p.fixable:
                self.ctx.fix_inode(ino, "nlink", want, p)
