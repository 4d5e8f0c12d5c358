"""The per-node write-ahead log: physical block journaling of metadata.

A transaction is written as descriptor blocks listing home addresses, full copies
of those blocks, then a commit block whose crc32c covers all of them. Ordering:
the caller's data blocks and the transaction's blocks are flushed to the device
before the commit block is written (ordered data), and the commit is flushed
before commit() returns.

Committed blocks are kept in `pending_home` until a checkpoint writes them to
their home addresses and advances the tail recorded in the journal header.
A checkpoint happens when the log has no room for the next transaction and at
close. `write_back` writes only some of them home and then logs a revoke record
for them (a lock going to another node: its blocks home, and never replayed
over what that node writes next), leaving the tail where it is. Replay
(replay_journal) is idempotent: it writes the same copies home again, skipping
revoked ones, and only then moves the tail.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from clusterfs.errors import FormatError, JournalError
from clusterfs.format.block import BLOCK_SIZE, BlockType, block_type
from clusterfs.format.journal import (
    JF_CLEAN,
    TARGETS_PER_DESC,
    JournalHeader,
    decode_commit,
    decode_descriptor,
    decode_jhead,
    decode_revoke,
    encode_commit,
    encode_descriptor,
    encode_jhead,
    encode_revoke,
)
from clusterfs.format.superblock import Superblock
from clusterfs.native import BufferPool, crc32c
from clusterfs.storage.device import BlockDevice

log = logging.getLogger(__name__)

# Log blocks (descriptors, copies, commit) a transaction may take to be committed
# through the device's io_uring from the event loop (log_without_thread): its 64 KiB
# buffer holds them with the data writes queued before them. Larger ones go through
# a worker thread, where their encoding does not hold the event loop either.
RING_COMMIT_BLOCKS = 8


@dataclass
class ReplayResult:
    transactions: int
    blocks: int
    next_seq: int
    next_off: int
    revoked: int = 0        # logged copies not replayed: a later transaction revoked them


Transaction = tuple[int, dict[int, bytes], list[int]]   # seq, {home: copy}, revoked homes


def _log_blocks(copies: int, revokes: int) -> int:
    """Log blocks a transaction of `copies` block copies and `revokes` revoked blocks
    takes: descriptors, copies, revoke records and the commit block."""
    return copies + -(-copies // TARGETS_PER_DESC) + -(-revokes // TARGETS_PER_DESC) + 1


def _log_positions(start: int, count: int, log_len: int) -> list[int]:
    """Offsets (1-based within the journal) of `count` consecutive log slots."""
    return [1 + (start - 1 + i) % log_len for i in range(count)]


def scan_journal(dev: BlockDevice, sb: Superblock, slot: int
                 ) -> tuple[JournalHeader, list[tuple[int, dict[int, bytes]]], int]:
    """Read a journal: (header, [(seq, {home: copy})...] committed in order, next offset),
    without the copies a later transaction revoked (what a replay writes)."""
    head, txns, off = _run_through(_scan_steps(dev, sb, slot))
    return head, [(seq, live) for seq, live, _revoked in _without_revoked(txns)], off


def _without_revoked(txns: list[Transaction]) -> list[Transaction]:
    """Each transaction's copies less those revoked by a later one: a revoke record in
    transaction R covers the copies of its blocks logged before R (jbd2's rule)."""
    revoked_at: dict[int, int] = {}
    for seq, _blocks, revokes in txns:
        for home in revokes:
            revoked_at[home] = seq
    return [(seq, {h: c for h, c in blocks.items() if revoked_at.get(h, seq) <= seq},
             revokes) for seq, blocks, revokes in txns]


# What replay_steps yields when the device must be flushed now: its driver flushes it
# (an event loop's in a worker thread: a flush drains the write-behind queue, and a
# survivor replaying under load stalled its loop past a second doing it there).
FLUSH = "flush"


def advance(steps, flush: Callable[[], None] | None = None) -> tuple[bool, Any]:
    """One step of a step generator (_scan_steps, replay_steps), calling `flush` where
    it yields FLUSH: (True, its value) once it ended. Returned, not raised: a worker
    thread's StopIteration, raised on through trio's coroutines, is a RuntimeError."""
    try:
        step = next(steps)
    except StopIteration as done:
        return True, done.value
    if step == FLUSH and flush is not None:
        flush()
    return False, None


def _run_through(steps, flush: Callable[[], None] | None = None) -> Any:
    """Run a step generator to its end in one go; its value."""
    while True:
        ended, value = advance(steps, flush)
        if ended:
            return value


def _scan_steps(dev: BlockDevice, sb: Superblock, slot: int):
    """scan_journal as a generator that yields after each transaction read (so a caller
    in an event loop can let other tasks run); its return value is scan_journal's."""
    jstart = sb.journal_location(slot)
    log_len = sb.journal_log_blocks
    head = decode_jhead(dev.read(jstart), jstart)
    txns: list[Transaction] = []
    seq, off = head.tail_seq, head.tail_off
    if head.flags & JF_CLEAN:
        return head, txns, off
    while True:
        found = _read_transaction(dev, jstart, log_len, seq, off)
        if found is None:
            break
        blocks, revokes, used = found
        txns.append((seq, blocks, revokes))
        seq += 1
        off = 1 + (off - 1 + used) % log_len
        if len(txns) > log_len:
            raise JournalError(f"journal {slot}: log loops")
        yield
    return head, txns, off


def _read_transaction(dev: BlockDevice, jstart: int, log_len: int, seq: int, off: int
                      ) -> tuple[dict[int, bytes], list[int], int] | None:
    """The transaction `seq` at log offset `off`, if complete and valid: its copies, the
    blocks it revokes and the log blocks it takes."""
    blocks: dict[int, bytes] = {}
    revokes: list[int] = []
    crc, used, pos = 0, 0, off
    while used < log_len:
        blkno = jstart + pos
        raw = dev.read(blkno)
        kind = block_type(raw)
        try:
            if kind == BlockType.JCOMMIT:
                got_seq, nblocks, want_crc = decode_commit(raw, blkno)
                if got_seq != seq or nblocks != used or want_crc != crc:
                    return None
                return blocks, revokes, used + 1
            if kind == BlockType.JREVOKE:
                got_seq, homes = decode_revoke(raw, blkno)
                if got_seq != seq:
                    return None
                crc = crc32c(raw, crc)
                revokes += homes
                used += 1
                pos = 1 + (off - 1 + used) % log_len
                continue
            if kind != BlockType.JDESC:
                return None
            got_seq, targets = decode_descriptor(raw, blkno)
        except FormatError:
            return None
        if got_seq != seq:
            return None
        crc = crc32c(raw, crc)
        for i, home in enumerate(targets):
            cpos = 1 + (pos - 1 + 1 + i) % log_len
            copy = dev.read(jstart + cpos)
            crc = crc32c(copy, crc)
            blocks[home] = copy
        used += 1 + len(targets)
        pos = 1 + (off - 1 + used) % log_len
    return None


def replay_journal(dev: BlockDevice, sb: Superblock, slot: int) -> ReplayResult:
    """Write every committed transaction home, flush, then move the tail past them."""
    return _run_through(replay_steps(dev, sb, slot), dev.flush)


HOME_RUN_BLOCKS = 64        # blocks one write home carries at most (256 KiB)
REPLAY_STEP_BLOCKS = 64     # blocks written home between two yields of replay_steps


def replay_steps(dev: BlockDevice, sb: Superblock, slot: int):
    """replay_journal as a generator: it yields after every transaction read and every
    REPLAY_STEP_BLOCKS blocks written, and returns the ReplayResult. A node replaying
    another's journal in its event loop lets its other tasks run in between: a replay
    of 40 000 blocks took 4 s, long enough for the others to miss its heartbeats. It
    yields FLUSH where the device must be flushed before it goes on (the driver
    flushes: in a worker thread, from an event loop)."""
    head, logged, off = yield from _scan_steps(dev, sb, slot)
    txns = _without_revoked(logged)
    revoked = sum(len(b) for _s, b, _r in logged) - sum(len(b) for _s, b, _r in txns)
    nblocks = 0
    for _seq, blocks, _revokes in txns:
        for home, copy in blocks.items():
            if not sb.rgrp_start <= home < sb.total_blocks and sb.orphan_slot(home) is None:
                raise JournalError(f"journal {slot}: transaction targets block {home}")
            dev.write(home, copy)
            nblocks += 1
            if nblocks % REPLAY_STEP_BLOCKS == 0:
                yield
    next_seq = head.tail_seq + len(txns)
    if txns:
        yield FLUSH                      # (the copies home before the tail moves)
        jstart = sb.journal_location(slot)
        dev.write(jstart, encode_jhead(JournalHeader(slot, next_seq, off, 0), jstart))
        yield FLUSH
        log.info("journal %d: replayed %d transactions (%d blocks); %d revoked copies "
                 "skipped", slot, len(txns), nblocks, revoked)
    return ReplayResult(len(txns), nblocks, next_seq, off, revoked)


@dataclass
class _Pending:
    blocks: dict[int, bytes]
    need: int
    crc: int
    commit_pos: int
    revokes: list[int]


class Journal:
    """The open journal of this node's slot."""

    def __init__(self, dev: BlockDevice, sb: Superblock, slot: int,
                 pool: BufferPool | None = None) -> None:
        self.dev = dev
        self.pool = pool
        self.slot = slot
        self.jstart = sb.journal_location(slot)
        self.log_len = sb.journal_log_blocks
        head = decode_jhead(dev.read(self.jstart), self.jstart)
        self.seq = head.tail_seq
        self.tail_off = self.head_off = head.tail_off
        self.used = 0
        self.pending_home: dict[int, bytes] = {}
        self.in_flight: dict[int, bytes] = {}
        self.stats = {"commits": 0, "blocks": 0, "checkpoints": 0, "flushes": 0,
                      "write_backs": 0, "revoked": 0}

    @property
    def max_transaction(self) -> int:
        """Most block copies one transaction may carry."""
        return (self.log_len - 2) * TARGETS_PER_DESC // (TARGETS_PER_DESC + 1) - 1

    def open(self) -> None:
        """Mark the journal dirty (in use) before the first transaction."""
        self._write_head(0)

    def commit(self, blocks: dict[int, bytes]) -> None:
        """Log one transaction durably (ordered after all data already written)."""
        self.stage(blocks)
        pending = self.log_transaction(blocks, ordered=True)
        if pending is not None:
            self.end_commit(pending)

    def stage(self, blocks: dict[int, bytes]) -> None:
        """The copies of a transaction about to be logged: read_committed answers from
        them from now on, while another thread writes them (log_transaction)."""
        self.in_flight = blocks

    def log_transaction(self, blocks: dict[int, bytes], ordered: bool) -> _Pending | None:
        """Everything of a commit but its accounting (end_commit), in the caller's
        thread: a worker's, so a full log's checkpoint and the waits for queued data
        writes (every write here waits for them) never block the event loop. With
        `ordered` (file data went to newly allocated blocks) the data and log blocks
        are flushed before the commit block is written, else one flush after it (a
        commit block on disk without its copies fails its checksum at replay). With
        nothing to log, just a flush. None then, else the transaction to end."""
        pending = self.begin_commit(blocks)
        if pending is None or ordered:
            self.dev.drain()
            self.dev.flush()
        if pending is not None:
            self.write_commit(pending)
            self.dev.flush()
        return pending

    async def log_without_thread(self, blocks: dict[int, bytes], ordered: bool
                                 ) -> tuple[bool, _Pending | None]:
        """log_transaction from the event loop with no worker thread, through the
        device's io_uring (BlockDevice.run_without_thread), for a small transaction
        that needs no checkpoint first: the queued data writes, the log blocks, the
        commit block and the flushes, linked in one submission in log_transaction's
        order; with nothing to log, as there, just the queued data and a flush (an
        fsync of an overwrite in place). (False, None) having written nothing when it
        cannot (then log_transaction in a worker thread); else (True, the transaction
        to end, None when there was nothing to log)."""
        if not blocks:
            return await self.dev.run_without_thread([None]), None
        homes = sorted(blocks)
        need = _log_blocks(len(homes), 0)
        if need > RING_COMMIT_BLOCKS or self.used + need > self.log_len - 1:
            return False, None
        payload, crc = self._encode(homes, blocks, [])
        positions = _log_positions(self.head_off, need, self.log_len)
        pending = _Pending(blocks, need, crc, positions[-1], [])
        commit_blk = self.jstart + pending.commit_pos
        commit = bytes(encode_commit(need - 1, crc, time.time_ns(), commit_blk, self.seq))
        logged = self._runs([self.jstart + p for p in positions[:-1]], payload)
        steps: list[list[tuple[int, bytes]] | None] = (
            [logged, None, [(commit_blk * BLOCK_SIZE, commit)], None] if ordered
            else [[*logged, (commit_blk * BLOCK_SIZE, commit)], None])
        self.in_flight = blocks
        if not await self.dev.run_without_thread(steps):
            return False, None
        return True, pending

    @staticmethod
    def _runs(blknos: list[int], payload: list[bytes], most: int | None = None
              ) -> list[tuple[int, bytes]]:
        """(offset, bytes) per stretch of consecutive block numbers (ascending), of at
        most `most` blocks when given."""
        out: list[tuple[int, bytes]] = []
        start = 0
        for i in range(1, len(blknos) + 1):
            if i == len(blknos) or blknos[i] != blknos[i - 1] + 1 or \
                    (most is not None and i - start == most):
                out.append((blknos[start] * BLOCK_SIZE, b"".join(payload[start:i])))
                start = i
        return out

    # The three steps of a commit (log_transaction runs the first two with their
    # flushes; write_back logs a revoke with them). Steps of one transaction must not
    # interleave with another commit or a checkpoint (the caller serialises them).
    def begin_commit(self, blocks: dict[int, bytes], revokes: list[int] | None = None
                     ) -> _Pending | None:
        """Checkpoint if the log is full, then write descriptors, copies and revoke
        records (no commit)."""
        revokes = sorted(revokes or ())
        if not blocks and not revokes:
            return None
        homes = sorted(blocks)
        need = _log_blocks(len(homes), len(revokes))
        if need > self.log_len - 1:
            raise JournalError(f"transaction of {len(homes)} blocks exceeds the journal")
        if self.used + need > self.log_len - 1:
            self.checkpoint()
        payload, crc = self._encode(homes, blocks, revokes)
        positions = _log_positions(self.head_off, need, self.log_len)
        self.in_flight = blocks
        self._write_runs([self.jstart + p for p in positions[:-1]], payload)
        return _Pending(blocks, need, crc, positions[-1], revokes)

    def write_commit(self, p: _Pending) -> None:
        commit_blk = self.jstart + p.commit_pos
        self._write_staged(commit_blk, encode_commit(p.need - 1, p.crc, time.time_ns(),
                                                     commit_blk, self.seq))

    def end_commit(self, p: _Pending, flushes: int = 2) -> None:
        """The commit block is durable: account for the transaction."""
        for home in p.revokes:           # (written home before they were revoked)
            self.pending_home.pop(home, None)
        self.pending_home.update(p.blocks)
        self.in_flight = {}
        self.head_off = 1 + p.commit_pos % self.log_len
        self.used += p.need
        self.seq += 1
        self.stats["commits"] += 1
        self.stats["blocks"] += len(p.blocks)
        self.stats["flushes"] += flushes

    def _encode(self, homes: list[int], blocks: dict[int, bytes], revokes: list[int]
                ) -> tuple[list[bytes], int]:
        out: list[bytes] = []
        crc = 0
        pos = self.head_off
        for i in range(0, len(homes), TARGETS_PER_DESC):
            chunk = homes[i : i + TARGETS_PER_DESC]
            desc = bytes(encode_descriptor(chunk, self.jstart + pos, self.seq))
            out.append(desc)
            crc = crc32c(desc, crc)
            for home in chunk:
                copy = blocks[home]
                if len(copy) != BLOCK_SIZE:
                    raise JournalError(f"block {home} copy is {len(copy)} bytes")
                out.append(copy)
                crc = crc32c(copy, crc)
            pos = 1 + (pos - 1 + 1 + len(chunk)) % self.log_len
        for i in range(0, len(revokes), TARGETS_PER_DESC):
            record = bytes(encode_revoke(revokes[i : i + TARGETS_PER_DESC],
                                         self.jstart + pos, self.seq))
            out.append(record)
            crc = crc32c(record, crc)
            pos = 1 + pos % self.log_len
        return out, crc

    def _write_runs(self, blknos: list[int], payload: list[bytes],
                    most: int | None = None) -> None:
        """Write payload[i] at block blknos[i] (ascending), one write per stretch of
        consecutive block numbers, of at most `most` blocks when given."""
        for offset, data in self._runs(blknos, payload, most):
            self.dev.write(offset // BLOCK_SIZE, data)

    def _write_home(self, homes: Iterable[int]) -> None:
        """Write these committed blocks home in runs of consecutive block numbers (at
        most HOME_RUN_BLOCKS): the inodes a burst of creates made sit side by side, and
        a write per block was half of their directory's demote (30 of 60 ms for 500
        new inodes, on a loop device); through a proxy each was a round trip."""
        order = sorted(homes)
        self._write_runs(order, [self.pending_home[h] for h in order], HOME_RUN_BLOCKS)

    def _write_staged(self, blkno: int, block: bytes | bytearray) -> None:
        """Write one block through a buffer of the preallocated reserve when there is one,
        so the commit itself does not depend on a fresh allocation."""
        buf = self.pool.get() if self.pool is not None else None
        if buf is None:
            self.dev.write(blkno, block)
            return
        try:
            buf[:BLOCK_SIZE] = block
            self.dev.write(blkno, buf[:BLOCK_SIZE])
        finally:
            self.pool.put(buf)

    def checkpoint(self) -> None:
        """Write committed blocks home, then free the log by moving the tail to the head.
        A block stays in `pending_home` (read_committed: still logged) until the moved
        tail is on disk: a lock may be given up without a flush once nothing of it is
        logged (fs: _nothing_to_flush), and until then a replay would still write it."""
        self._write_home(self.pending_home)
        self.dev.flush()
        self.tail_off = self.head_off
        self.used = 0
        self._write_head(0)
        self.pending_home.clear()
        self.stats["checkpoints"] += 1

    def logged_among(self, homes: Iterable[int]) -> list[int]:
        """Those of `homes` committed here and not yet written home."""
        pending = self.pending_home
        return [home for home in homes if home in pending]

    def room_to_revoke(self, count: int) -> bool:
        """Does a transaction revoking `count` blocks fit without a checkpoint?"""
        return self.used + _log_blocks(0, count) <= self.log_len - 1

    def write_back(self, homes: list[int]) -> None:
        """Write these committed blocks home, flush, then log and commit a revoke record
        for them: from then on neither this node's copies in the log (a replay skips
        them) nor its memory (`read_committed`) stand for them, and a lock covering them
        may go to another node. The tail stays: the log's other blocks are not home.
        The caller made sure the revoke fits (room_to_revoke), so no checkpoint runs
        in between."""
        self._write_home(homes)
        self.dev.flush()
        pending = self.begin_commit({}, homes)
        assert pending is not None
        # one flush: a commit block that reached the disk without its revoke record
        # fails the checksum, and the lock is not given up before this flush returns
        self.write_commit(pending)
        self.dev.flush()
        self.end_commit(pending, flushes=2)
        self.stats["write_backs"] += 1
        self.stats["revoked"] += len(homes)

    def close(self) -> None:
        """Checkpoint and mark the journal clean (nothing to replay)."""
        self.checkpoint()
        self._write_head(JF_CLEAN)

    def _write_head(self, flags: int) -> None:
        head = JournalHeader(self.slot, self.seq, self.tail_off, flags)
        self.dev.write(self.jstart, encode_jhead(head, self.jstart))
        self.dev.flush()

    def read_committed(self, blkno: int) -> bytes | None:
        """The newest logged copy of a block not yet written home (or being committed)."""
        copy = self.in_flight.get(blkno)
        return copy if copy is not None else self.pending_home.get(blkno)

    @property
    def free_slots(self) -> int:
        return self.log_len - 1 - self.used
