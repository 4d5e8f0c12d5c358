"""Blocks: the one way from the filesystem to the blocks it reads and writes.

Metadata is read as its newest committed copy: the journal's copy of a block
committed but not yet written home (or being committed), else the device's. In a
cluster that copy is also the newest anywhere, because a lock never goes to
another node before everything under it is home (docs/journal.md). File data
goes straight to its blocks on the device: queued to the write-behind thread
(a commit waits for the queue, so data precedes the metadata pointing at it) and
read with the device's read-ahead. The fs layer holds a `Blocks` and never the
device or the journal.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from clusterfs.errors import FormatError
from clusterfs.format.block import BLOCK_SIZE
from clusterfs.format.superblock import Superblock
from clusterfs.journal.log import Journal
from clusterfs.storage.device import BlockDevice

RECENT_WRITES = 1024      # data writes remembered for DataAhead's check


@dataclass
class DataAhead:
    """Data blocks read ahead with the event loop free (read_data_ahead), valid while
    no write of them has been queued since `seq`."""
    seq: int
    blocks: dict[int, bytes]


class Blocks:
    def __init__(self, dev: BlockDevice, journal: Journal, sb: Superblock) -> None:
        self._dev = dev
        self._journal = journal
        self._sb = sb
        self.slot = journal.slot          # this node's journal (and orphan list)
        # every data write queued, numbered: (seq, first block, end block); a copy read
        # ahead is stale once one of them overlaps it (DataAhead)
        self._write_seq = 0
        self._recent: deque[tuple[int, int, int]] = deque(maxlen=RECENT_WRITES)

    # -- metadata -------------------------------------------------------------------
    def read_meta(self, blkno: int) -> bytes:
        """A metadata block (resource groups onward, or an orphan block): the newest
        committed copy."""
        if not (self._sb.rgrp_start <= blkno < self._sb.total_blocks
                or self._sb.orphan_slot(blkno) is not None):
            raise FormatError(f"metadata block {blkno} out of range")
        copy = self._journal.read_committed(blkno)
        return copy if copy is not None else self._dev.read(blkno)

    def read_meta_run(self, first: int, count: int) -> bytes:
        """The device's copy of `count` blocks from `first` in one read (loading many
        inodes at once); a block `logged()` says the journal holds newer is stale here."""
        return self._dev.read(first, count)

    async def read_meta_run_async(self, first: int, count: int) -> bytes:
        """read_meta_run() with the event loop free while the device reads (io_uring,
        else a worker thread)."""
        return await self._dev.read_async(first * BLOCK_SIZE, count * BLOCK_SIZE,
                                          off_loop=True)

    def logged(self, blkno: int) -> bool:
        return self._journal.read_committed(blkno) is not None

    # -- file data ------------------------------------------------------------------
    def read_data(self, pblk: int, count: int) -> bytes | memoryview:
        """`count` data blocks from `pblk` (a view into a read-ahead buffer is valid
        only until the next device call: BlockDevice.read_data)."""
        return self._dev.read_data(pblk * BLOCK_SIZE, count * BLOCK_SIZE)

    async def data_ready(self, pblk: int, count: int) -> bool:
        """Whether read_data() of these blocks will be answered from read-ahead at once
        (waited for, with the event loop free, if still being read); False: read them
        with read_data_async."""
        return await self._dev.data_ready(pblk * BLOCK_SIZE, count * BLOCK_SIZE)

    async def read_data_async(self, pblk: int, count: int) -> bytes:
        """`count` data blocks from `pblk`, read with the event loop free meanwhile
        (queued writes of them laid over, as read_data does)."""
        return await self._dev.read_async(pblk * BLOCK_SIZE, count * BLOCK_SIZE)

    def read_data_block(self, pblk: int) -> bytes:
        """One data block, newest copy: a write of it still queued counts."""
        return self._dev.read_newest(pblk)

    async def read_data_ahead(self, pblks: list[int]) -> DataAhead:
        """These data blocks, newest copies, read with the event loop free, for a body
        that needs them next (data_block)."""
        seq = self._write_seq
        got = {}
        for pblk in pblks:
            copy = self._dev.queued_copy(pblk)     # a write still queued holds it whole
            got[pblk] = copy if copy is not None else \
                await self._dev.read_async(pblk * BLOCK_SIZE, BLOCK_SIZE)
        return DataAhead(seq, got)

    def data_block(self, pblk: int, ahead: DataAhead | None) -> bytes:
        """read_data_block(), from `ahead` when it holds the block and no write of it
        was queued since it was read."""
        if ahead is not None:
            raw = ahead.blocks.get(pblk)
            if raw is not None and not self._written_since(ahead.seq, pblk):
                return raw
        return self.read_data_block(pblk)

    def _written_since(self, seq: int, pblk: int) -> bool:
        if seq == self._write_seq:
            return False
        if not self._recent or self._recent[0][0] > seq + 1:
            return True                   # some of those writes are no longer listed
        for s, first, end in reversed(self._recent):
            if s <= seq:
                return False
            if first <= pblk < end:
                return True
        return False

    def _queued(self, pblk: int, length: int) -> None:
        self._write_seq += 1
        self._recent.append((self._write_seq, pblk, pblk + -(-length // BLOCK_SIZE)))

    def write_data(self, pblk: int, chunk: memoryview) -> None:
        """Queued to the write-behind thread; the request is answered meanwhile."""
        self._queued(pblk, len(chunk))
        self._dev.write_behind(pblk * BLOCK_SIZE, chunk)

    def zero_data(self, pblk: int, offset: int) -> None:
        """Zeros from `offset` to the end of data block `pblk` (a truncated tail),
        queued like any data write: the block's newest bytes before `offset`, then
        zeros. (A plain write here waited for the whole queue on the event loop.)"""
        head = self._dev.read_newest(pblk)[:offset]
        self._queued(pblk, BLOCK_SIZE)
        self._dev.write_behind(pblk * BLOCK_SIZE, head + bytes(BLOCK_SIZE - offset))

    def advise_willneed(self, pblk: int, count: int) -> None:
        self._dev.advise_willneed(pblk, count)

    def forget_read_ahead(self) -> None:
        """Another node may rewrite data blocks we read ahead: drop them."""
        self._dev.forget_read_ahead()

    def write_room(self, length: int) -> bool:
        return self._dev.behind_has_room(length)

    def wait_write_room(self, length: int) -> None:
        """Blocks until the write-behind queue has room (call from a worker thread)."""
        self._dev.wait_behind_room(length)
