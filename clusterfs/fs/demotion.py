"""Demotion: what the filesystem does when one of its locks goes down (another
node asked, or the lock cache lets it go): commit, write home what the lock
covers with a revoke record (or everything), drop the objects it covers, tell
the kernel to forget (docs/journal.md, "No stale replay").

A mixin of FileSystem (fs/filesystem.py), split out by noun: its methods use the
filesystem's state and plumbing (`_hold`, `_inode`, `txn`, `glocks`, ...).
"""

from __future__ import annotations

import trio

from clusterfs.cache.glock import Glock
from clusterfs.cache.transaction import Covered
from clusterfs.dlm.interface import Mode
from clusterfs.fs.alloc import encode_free_lvb

# At most this many inodes made under a directory's lock keep their copies when that
# lock goes to PR (their own locks taken then, about 25 µs each here): a reader on
# another node waits for them, so a longer burst's rest is dropped and read again.
KEEP_ON_SHARE = 4096


class Demotion:
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
        if any(self._pending(child) for child in self._unguarded.get(ino, ())):
            return False                 # (made in it, covered by its lock: _covered_by)
        if self.inodes.get(ino) is None:
            # (freed here: its tombstone may be dirty, with no cached inode to say so)
            return ino not in self.freed and not self.blocks.logged(ino)
        return not self._pending(ino)

    def _pending(self, ino: int) -> bool:
        """A change to the cached inode `ino` is dirty, or logged and not yet home."""
        node = self.inodes.get(ino)
        if node is None:
            return self.blocks.logged(ino)
        return self.txn.is_dirty(node) or \
            any(self.blocks.logged(blkno) for blkno in node.meta_blocks())

    async def _let_children_go(self, ino: int, target: Mode) -> None:
        """(Directory `ino`'s lock going down, its flush done.) The inodes made in it
        with no lock of their own were covered by its lock only; they are home now.
        Going to PR (a reader elsewhere, or idle sharing), this node keeps reading the
        directory: it takes their own locks in PR, many at once, and keeps its copies
        (nothing could change them while the directory's EX was still held, as it is
        until this returns), so it goes on answering for them from its cache and
        another node reads them with no demote here. Otherwise, or where that fails,
        it drops them and has the kernel forget their attributes: another node may
        take their own locks and change them without asking this one.

        A local operation on one of them may take its own lock during the warm and
        change it: the cached copy is the one it changed, kept at the grant
        (keep_at_first_grant), never a copy from before the warm put back over it."""
        children = self._unguarded.pop(ino, None)
        if not children:
            return
        for child in children:
            self._unguarded_in.pop(child, None)
        kept = sorted(children)[:KEEP_ON_SHARE] if target == Mode.PR else []
        if kept:
            self.inodes.keep_at_first_grant(kept)
            try:
                # (at once or not at all: this demote must not wait on a lock whose
                # holder may wait for it, as a local operation holding a child and
                # waiting for this directory would when another node asks for the child)
                await self.glocks.warm(((("inode", c), Mode.PR) for c in kept), at_once=True)
            finally:
                self.inodes.end_keep(kept)
        held = {c for c in kept if self._held(c)}
        lost = []
        for child in sorted(children):
            if child not in held:
                self.inodes.drop_if_clean(child)
                lost.append(child)
        await self.kernel_forget.forget_many(lost)

    def _held(self, ino: int) -> bool:
        """This node holds inode `ino`'s own lock (in the cache, in some mode)."""
        glock = self.glocks.glocks.get(("inode", ino))
        return glock is not None and glock.mode is not None

    async def _demote_inode(self, glock: Glock, target: Mode) -> None:
        """Another node wants this inode (or the lock cache lets it go): flush;
        going to nothing, also drop our copy (open or not: per-open state lives in
        self.opens) and tell the kernel. An inode with nothing of it dirty or in the
        journal needs no flush, only queued data writes on the device
        (_nothing_to_flush): a busy node does not write its whole journal home because
        another node reads one of its older files."""
        ino = glock.name[1]
        for child in list(self._unguarded.get(ino, ())):
            await self._settle_iopen(child)       # before another node can reach it
        if self._nothing_to_flush(glock) and self.txn.withdrawn is None:
            await self.txn.drain_data()
        else:
            await self._flush_for_demote(self._covered_by(ino))
        await self._let_children_go(ino, target)
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
            out = node.meta_blocks()
            for child in self._unguarded.get(ino, ()):
                made = self.inodes.get(child)
                out += made.meta_blocks() if made is not None else [child]
            return out
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
