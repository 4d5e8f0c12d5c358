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

from clusterfs.errors import FormatError
from clusterfs.format.block import BLOCK_SIZE
from clusterfs.format.superblock import Superblock
from clusterfs.journal.log import Journal
from clusterfs.storage.device import BlockDevice


class Blocks:
    def __init__(self, dev: BlockDevice, journal: Journal, sb: Superblock) -> None:
        self._dev = dev
        self._journal = journal
        self._sb = sb
        self.slot = journal.slot          # this node's journal (and orphan list)

    # -- metadata -------------------------------------------------------------------
    def is_meta(self, blkno: int) -> bool:
        """Whether `blkno` may hold metadata: resource groups onward, or an orphan block."""
        return (self._sb.rgrp_start <= blkno < self._sb.total_blocks
                or self._sb.orphan_slot(blkno) is not None)

    def read_meta(self, blkno: int) -> bytes:
        """A metadata block (is_meta): the newest committed copy."""
        if not self.is_meta(blkno):
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

    async def read_data_async(self, pblk: int, count: int, off_loop: bool = False) -> bytes:
        """`count` data blocks from `pblk`, read with the event loop free meanwhile
        (queued writes of them laid over, as read_data does) when the io_uring takes
        it; else on the loop, or with `off_loop` in a worker thread."""
        return await self._dev.read_async(pblk * BLOCK_SIZE, count * BLOCK_SIZE,
                                          off_loop=off_loop)

    def queued_data_block(self, pblk: int) -> bytes | None:
        """One data block as a write of it still queued holds it whole, else None (no
        device read; and no wait for a device another thread holds: read it then)."""
        return self._dev.queued_copy(pblk, wait=False)

    def read_data_block(self, pblk: int) -> bytes:
        """One data block, newest copy: a write of it still queued counts."""
        return self._dev.read_newest(pblk)

    def write_data(self, pblk: int, chunk: memoryview) -> None:
        """Queued to the write-behind thread; the request is answered meanwhile."""
        self._dev.write_behind(pblk * BLOCK_SIZE, chunk)

    def zero_data(self, pblk: int, offset: int, newest: bytes | None = None) -> None:
        """Zeros from `offset` to the end of data block `pblk` (a truncated tail),
        queued like any data write: the block's newest bytes before `offset` (`newest`
        when the caller read them ahead), then zeros. (A plain write here waited for
        the whole queue on the event loop.)"""
        head = (newest if newest is not None else self._dev.read_newest(pblk))[:offset]
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
