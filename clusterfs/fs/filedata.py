"""FileData: fsync and fdatasync, read (with the device's read-ahead), write
(stuffed in the inode, in place under byte-range data locks, or into new
extents) and truncate.

A mixin of FileSystem (fs/filesystem.py), split out by noun: its methods use the
filesystem's state and plumbing (`_hold`, `_inode`, `txn`, `glocks`, ...).
"""

from __future__ import annotations

import errno
import stat
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import TypeVar

from clusterfs import workers
from clusterfs.dlm.interface import Mode
from clusterfs.errors import FSError, StorageError
from clusterfs.format import extent as fext
from clusterfs.format.block import BLOCK_SIZE
from clusterfs.format.inode import (
    F_EXTENTS,
    PAYLOAD_MAX,
)
from clusterfs.fs import extents as ext
from clusterfs.fs.inode import CachedInode

READAHEAD_TRIGGER = 128 * 1024   # a read this large is taken as sequential
# Device read-ahead for a sequential reader: keep up to READAHEAD_BLOCKS (32 MiB)
# advised ahead of it, topped up in steps of READAHEAD_STEP (8 MiB). A 4 MiB window
# left most 1 MiB reads waiting on the disk (half the read time in pread, cold);
# a deep queue keeps the disk streaming while we answer FUSE.
READAHEAD_BLOCKS = 8192
READAHEAD_STEP = 2048
# A read whose file changed while it read the device (see FileData._read) tries again;
# the last of these tries reads in line, with nothing else running meanwhile.
READ_ATTEMPTS = 3
# An overwrite in place leaves the file's times alone when they are this recent
# (and not in the future): the times live in the inode, which the overwrite holds
# only in PR. A write after a longer pause takes the inode in EX and sets them, so
# mtime and ctime lag a cluster's writes by less than this.
WRITE_TIMES_SLACK_NS = 1_000_000_000
T = TypeVar("T")


def _queued_bytes(off: int, size: int) -> int:
    """What a write of `size` bytes at `off` queues for the device: the whole blocks it
    touches (a 512-byte write queues its 4 KiB block, assembled with the old bytes)."""
    if not size:
        return 0
    return ((off + size - 1) // BLOCK_SIZE - off // BLOCK_SIZE + 1) * BLOCK_SIZE


def _edge_blocks(off: int, size: int) -> tuple[int, ...]:
    """The blocks a write of `size` bytes at `off` fills only in part: their other
    bytes are read (FileSystem.read_edges_ahead, with the event loop free)."""
    if not size:
        return ()
    end = off + size
    head = (off // BLOCK_SIZE,) if off % BLOCK_SIZE else ()
    tail = ((end - 1) // BLOCK_SIZE,) if end % BLOCK_SIZE else ()
    return head + tail


def _cut_block(node: CachedInode, size: int) -> tuple[int, ...]:
    """The block a truncate to `size` keeps only in part (its tail is zeroed)."""
    return (size // BLOCK_SIZE,) if size % BLOCK_SIZE and size < node.d.size else ()


class _QueueFull(Exception):
    """Other writes filled the write-behind queue while a write took its locks: it lets
    them go, having changed nothing, and waits for room off the event loop. Queueing
    without room waited on the loop itself, for as long as the disk took to write the
    queue (seconds of scattered 4 KiB writes: stress-ng's fpunch on three nodes
    stopped a node's heartbeats long enough to have it fenced)."""

    def __init__(self, needed: int) -> None:
        super().__init__(needed)
        self.needed = needed            # bytes of room the operation waits for


class FileData:
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
                return await self._read(node, off, size)
            except StorageError as exc:
                raise FSError(errno.EIO, str(exc)) from exc

    async def _read(self, node: CachedInode, off: int, size: int) -> bytes | memoryview:
        """The bytes; a memoryview into a read-ahead buffer is valid only until the next
        device call, i.e. for the reply to this request (see BlockDevice.read_data).

        What read-ahead does not hold is read first, with the event loop free (a read
        on a busy disk takes tens of milliseconds and more, and the loop answers
        heartbeats and lock traffic), and read-ahead still being read is waited for
        the same way. Local operations share the glocks this read holds, so one may
        change the file meanwhile (a truncate, a write into a hole): if its block map
        or size changed, what was read may be blocks the file no longer has, and it
        is read again (the last try reads in line, as before: nothing runs between).
        Then, with no await until the reply, the views into read-ahead buffers are
        taken: a buffer may be refilled once another request runs."""
        for attempt in range(READ_ATTEMPTS):
            version = node.meta_version
            fsize = node.d.size
            if off >= fsize or size <= 0:
                return b""
            length = min(size, fsize - off)
            if node.stuffed:
                return bytes(node.data[off : off + length])
            first, last = off // BLOCK_SIZE, (off + length - 1) // BLOCK_SIZE
            if length >= READAHEAD_TRIGGER and attempt == 0:
                self._read_ahead(node, last + 1)
            mapped = ext.map_range(node.extents, first, last - first + 1)
            read: dict[int, bytes] = {}
            if attempt < READ_ATTEMPTS - 1:
                for i, (_l, pblk, n) in enumerate(mapped):
                    if pblk is not None and not await self.blocks.data_ready(pblk, n):
                        read[i] = await self.blocks.read_data_async(pblk, n)
                if node.meta_version != version:
                    continue
            pieces: list[bytes | memoryview] = []
            for i, (_l, pblk, n) in enumerate(mapped):
                if pblk is None:
                    pieces.append(bytes(n * BLOCK_SIZE))
                else:
                    got = read.get(i)
                    pieces.append(got if got is not None else self.blocks.read_data(pblk, n))
            skip = off - first * BLOCK_SIZE
            data = pieces[0] if len(pieces) == 1 else b"".join(pieces)
            return data[skip : skip + length] if skip or len(data) != length else data
        raise AssertionError("unreachable: the last attempt reads in line")

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
        node.read_ahead_done = end
        if not self.clustered:
            self._advise(node, done, end)
            return
        # In a cluster a chunk read ahead must be covered by its data lock held here
        # from before the read starts until the copy is used: another node writes in
        # place under the data lock's EX, and giving that up (to NL) is what drops our
        # copies (_demote_data). Chunks held now are read at once; the locks of the
        # others are taken in the background (no request waits a round trip per
        # chunk), and each is read once its lock is here.
        per = self.data_lock_blocks
        ino = node.d.ino
        later: list[tuple[tuple, Mode]] = []
        for chunk in range(done // per, (end - 1) // per + 1):
            lo, hi = max(done, chunk * per), min(end, (chunk + 1) * per)
            if self.glocks.cached_for(("data", ino, chunk), Mode.PR):
                self._advise(node, lo, hi)
            else:
                later.append((("data", ino, chunk), Mode.PR))
        if later:
            self.glocks.warm_soon(later, lambda name: self._advise_held(ino, name[2],
                                                                        done, end))

    def _advise(self, node: CachedInode, lo: int, hi: int) -> None:
        """Have the device read logical blocks [lo, hi) of a file ahead."""
        for _l, pblk, n in ext.map_range(node.extents, lo, hi - lo):
            if pblk is not None:
                self.blocks.advise_willneed(pblk, n)

    def _advise_held(self, ino: int, chunk: int, done: int, end: int) -> None:
        """(Holding data chunk `chunk` of inode `ino`.) Read its part of [done, end)
        ahead, if the inode is cached under its lock: its block map is true then."""
        glock = self.glocks.hold_if_cached(("inode", ino), Mode.PR)
        if glock is None:
            return
        try:
            node = self.inodes.get(ino)
            per = self.data_lock_blocks
            if node is not None and node.read_ahead_done >= end:
                self._advise(node, max(done, chunk * per), min(end, (chunk + 1) * per))
        finally:
            self.glocks.release([glock])

    async def write(self, ino: int, off: int, data: bytes) -> int:
        if off + len(data) > (1 << 63) - 1:
            raise FSError(errno.EFBIG)
        queued = _queued_bytes(off, len(data))

        async def run(alloc):
            # extent blocks may be given back when extents merge
            async with self._hold(ex=[ino], alloc=alloc,
                                  frees=lambda: self._inode(ino).ext_blocks,
                                  edges=(ino, lambda _node: _edge_blocks(off, len(data)))):
                node = self._inode(ino)
                # unstuffing queues the inline bytes' block as well
                self._check_room(queued + (BLOCK_SIZE if node.stuffed else 0))
                self._write(node, off, data)
                return len(data)

        async def attempt() -> int:
            if self.clustered and await self._overwrite_in_place(ino, off, data, queued):
                return len(data)
            node = self.inodes.get(ino)
            goal = ino if node is None else self._write_goal(node, off)
            return await self._retrying(run, goal, len(data) // BLOCK_SIZE + 2)

        return await self._with_room(queued, attempt)

    async def _with_room(self, need: int, attempt: Callable[[], Awaitable[T]]) -> T:
        """Run `attempt` (an operation that queues data writes and checks, under its
        locks, that the write-behind queue has room for them: _check_room) until it
        finds the room; wait for room in a worker thread, never in the event loop."""
        while True:
            if not self.blocks.write_room(need):
                await workers.run(self.blocks.wait_write_room, need)
            try:
                return await attempt()
            except _QueueFull as full:
                need = full.needed   # nothing changed: wait for room again, unlocked

    def _check_room(self, queued: int) -> None:
        """(In the operation's body, before it changes anything.) Raise _QueueFull if the
        write-behind queue cannot take `queued` bytes now: other writes filled it while
        this one took its locks, and queueing would wait for room on the event loop."""
        if not self.blocks.write_room(queued):
            raise _QueueFull(queued)

    async def _overwrite_in_place(self, ino: int, off: int, data: bytes, queued: int) -> bool:
        """A cluster's overwrite of blocks the file already has, inside its size, with
        recent times: under the inode's lock in PR and the data chunks' in EX, so
        another node writing other chunks of the file (or reading its attributes)
        goes on at the same time. False, having changed nothing, when the write
        needs more (blocks, size or times: then it takes the inode in EX)."""
        cached = self.inodes.get(ino)
        if cached is not None and not self._fits_in_place(cached, off, len(data)):
            return False                 # (a copy cached under no lock: only a guess)
        async with self._hold(pr=[ino], write=False,
                              data=self.data_locks(ino, off, len(data), Mode.EX),
                              edges=(ino, lambda _node: _edge_blocks(off, len(data)))):
            self._check_room(queued)
            self.txn.check_writable()
            node = self._inode(ino)
            if not self._fits_in_place(node, off, len(data)):
                return False
            first, last = off // BLOCK_SIZE, (off + len(data) - 1) // BLOCK_SIZE
            runs = ext.map_range(node.extents, first, last - first + 1)
            blocks = self._assemble(node, off, data, first, last, runs)
            for lblk, pblk, n in runs:
                self._write_data(node, pblk, blocks.span(lblk - first, n))
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
        goal = self._write_goal(node, off)
        new_runs = self._reserve_runs(goal, holes + unstuff)
        if holes or unstuff or end > node.d.size:
            node.meta_version += 1          # block map or size: a datasync must commit
        if holes or unstuff:
            self.txn.fresh_data = True      # that commit must flush the data first
        try:
            meta = self._reserve(goal, 2) if len(node.extents) + len(new_runs) > \
                fext.INLINE_EXTENTS else []
        except FSError:
            # ENOSPC for the extent list's blocks: the data blocks go back too (they
            # stayed taken, blocks no file held: fsck's "leaked" after a disk filled)
            self._unreserve([b for s, c in new_runs for b in range(s, s + c)])
            raise
        # -- no failure past this point except I/O
        if node.stuffed:
            node.set_map_kind(F_EXTENTS)
            node.data = bytearray()
            if unstuff:
                pblk, _n = self._take_run(new_runs, 1)
                self._write_data(node, pblk, [memoryview(old.ljust(BLOCK_SIZE, b"\0"))])
                node.map_extent(fext.Extent(0, pblk, 1))
                if first == 0:
                    runs = ext.map_range(node.extents, first, last - first + 1)
        blocks = self._assemble(node, off, data, first, last, runs)
        for lblk, pblk, n in runs:
            if pblk is not None:
                self._write_data(node, pblk, blocks.span(lblk - first, n))
                continue
            done = 0
            while done < n:
                pstart, got = self._take_run(new_runs, n - done)
                self._write_data(node, pstart, blocks.span(lblk - first + done, got))
                node.map_extent(fext.Extent(lblk + done, pstart, got))
                done += got
        self._unreserve([b for s, c in new_runs for b in range(s, s + c)])
        self._fit_extent_blocks(node, meta)
        node.d.size = max(node.d.size, end)
        node.touch()
        self._dirty(node)

    def _write_goal(self, node: CachedInode, off: int) -> int:
        """Where a write's new blocks should go. Right after the block before the
        write when that one is mapped: a sequential writer's run goes on. Otherwise
        after the file's last block (or its inode), but in a cluster only if that lies
        in this node's home group, else in the home group: two nodes writing separate
        parts of one file then allocate from groups of their own, and do not hand
        each other a group's lock (and its flush) at every turn of the file's."""
        lblk = off // BLOCK_SIZE
        if lblk:
            ((_l, pblk, _n),) = ext.map_range(node.extents, lblk - 1, 1)
            if pblk is not None:
                return pblk + 1
        last = node.extents[-1] if node.extents else None
        goal = last.pblk + last.count if last is not None else node.ino
        if self.clustered and not self._in_home_group(goal):
            return self._home_start()
        return goal

    def _in_home_group(self, block: int) -> bool:
        return block >= self.sb.rgrp_start and self.alloc.group_of(block) == self.home_group

    def _write_data(self, node: CachedInode, pblk: int, pieces: list[memoryview]) -> None:
        """File data straight to its blocks, queued to the device's write-behind thread:
        the request is answered while the copy is made (the journal commit waits for
        the queue before it flushes, so data still precedes the metadata that points
        at it, and fsync still makes it durable)."""
        node.data_version += 1           # (a block read ahead of this body is stale now)
        for piece in pieces:
            self.blocks.write_data(pblk, piece)
            pblk += len(piece) // BLOCK_SIZE

    def _assemble(self, node: CachedInode, off: int, data: bytes | memoryview, first: int,
                  last: int, runs: list) -> _Assembled:
        """Whole blocks covering the write: a block it fills only in part is made of
        its existing bytes (zeros in a hole) and the new ones; the blocks it fills
        whole are views of `data`, not copies (a direct write the kernel split at the
        page edges of the user's buffer ends inside a block: its megabyte is not
        copied for the sake of that one block)."""
        view = memoryview(data)
        start, end = first * BLOCK_SIZE, off + len(data)
        tail_at = last * BLOCK_SIZE
        head_cut, tail_cut = off - start, (last + 1) * BLOCK_SIZE - end
        if first == last and (head_cut or tail_cut):
            return _Assembled([self._edge_block(node, runs, first, head_cut, view)])
        pieces = []
        if head_cut:
            pieces.append(self._edge_block(node, runs, first, head_cut,
                                           view[: BLOCK_SIZE - head_cut]))
        inner_from = start + BLOCK_SIZE if head_cut else off
        inner_to = tail_at if tail_cut else end
        if inner_to > inner_from:
            pieces.append(view[inner_from - off : inner_to - off])
        if tail_cut:
            pieces.append(self._edge_block(node, runs, last, 0, view[tail_at - off :]))
        return _Assembled(pieces)

    def _edge_block(self, node: CachedInode, runs: list, lblk: int, at: int,
                    part: memoryview) -> memoryview:
        """Block `lblk` of the write with `part` put at byte `at` over what it holds:
        as the hold read it ahead, or (a write of the file since) read now."""
        for first, pblk, n in runs:
            if pblk is not None and first <= lblk < first + n:
                pblk += lblk - first
                copy = self.edge_copy(node, pblk)
                block = bytearray(copy if copy is not None else
                                  self.blocks.read_data_block(pblk))
                break
        else:
            block = bytearray(BLOCK_SIZE)
        block[at : at + len(part)] = part
        return memoryview(block)

    async def read_edges_ahead(self, ino: int,
                               which: Callable[[CachedInode], Iterable[int]]
                               ) -> dict[int, tuple[CachedInode, int, bytes]]:
        """(Under the locks that cover these blocks.) Read the file's data blocks at
        the logical blocks `which(inode)` names, with the event loop free, for a body
        that keeps part of each (a write that fills a block only in part, a truncate's
        cut tail): read by the body, on the loop, one such read under a busy disk's
        load stopped it for 0.38 s. A hole or a stuffed file reads nothing. Another
        body of this node may write a block while this reads it: the inode's
        data_version then moves and the body reads the block again (edge_copy)."""
        node = self.inodes.get(ino)
        ahead: dict[int, tuple[CachedInode, int, bytes]] = {}
        if node is None or node.stuffed:
            return ahead
        for lblk in sorted(set(which(node))):
            pblk = ext.map_range(node.extents, lblk, 1)[0][1]
            if pblk is None or pblk in ahead:
                continue
            # the version before the read is issued: the read lays over it every write
            # of the block queued so far, and a later one moves the version
            version = node.data_version
            data = self.blocks.queued_data_block(pblk)   # (a streaming writer's: no read)
            if data is None:
                try:
                    data = await self.blocks.read_data_async(pblk, 1, off_loop=True)
                except StorageError:
                    continue             # the body reads it and reports it
            ahead[pblk] = (node, version, data)
        return ahead

    def edge_copy(self, node: CachedInode, pblk: int) -> bytes | None:
        """The running body's read-ahead copy of data block `pblk` of `node`, if it is
        still the newest (no write or truncate of the file since it was read)."""
        got = self.edges_ahead.get(pblk)
        if got is None or got[0] is not node or got[1] != node.data_version:
            return None
        return got[2]

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
                                  frees=lambda: self._tail_blocks(ino, size),
                                  edges=(ino, lambda node: _cut_block(node, size))):
                # a truncate queues one block at most: the tail's zeroed block, or an
                # unstuffed file's first
                self._check_room(BLOCK_SIZE)
                self._truncate(self._inode(ino), size)

        async def attempt() -> None:
            await self._retrying(run, ino, 4)

        await self._with_room(BLOCK_SIZE, attempt)

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
            for pblk, n in node.unmap_from(keep):
                self._release(pblk, n)
            if size % BLOCK_SIZE:
                tail = ext.map_range(node.extents, size // BLOCK_SIZE, 1)[0]
                if tail[1] is not None:
                    cut = size % BLOCK_SIZE
                    self.blocks.zero_data(tail[1], cut, self.edge_copy(node, tail[1]))
            self._fit_extent_blocks(node, [])
        node.data_version += 1           # blocks unmapped (to be reused), a tail zeroed
        node.d.size = size
        node.touch()
        self._dirty(node)


class _Assembled:
    """The whole blocks a write covers, as consecutive pieces of whole blocks."""

    __slots__ = ("pieces",)

    def __init__(self, pieces: list[memoryview]) -> None:
        self.pieces = pieces

    def span(self, index: int, count: int) -> list[memoryview]:
        """The pieces of blocks index .. index + count - 1 (from the write's first)."""
        lo, hi = index * BLOCK_SIZE, (index + count) * BLOCK_SIZE
        out, at = [], 0
        for piece in self.pieces:
            end = at + len(piece)
            if at < hi and lo < end:
                out.append(piece[max(lo, at) - at : min(hi, end) - at])
            at = end
        return out
