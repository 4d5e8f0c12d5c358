"""The running transaction: dirty metadata objects batched into one journal commit.

Any number of operations dirty objects (inodes, directory leaves, resource
groups); an object dirtied many times is logged once. The transaction commits on
fsync, when it grows large, on a timer (COMMIT_INTERVAL) and at unmount. Each
dirty object encodes itself to whole blocks with `to_blocks()` at commit time.

The health flag lives here too: once the filesystem withdraws (corruption found,
or the right to write lost), nothing more is written to disk.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import trio

from clusterfs import workers
from clusterfs.errors import Withdrawn
from clusterfs.journal.log import Journal

log = logging.getLogger(__name__)
COMMIT_INTERVAL = 2.0        # seconds a dirty transaction may wait
IDLE_WRITEBACK = 1.0         # seconds without a change before everything goes home
LARGE_FRACTION = 4           # commit when estimated blocks > journal max / this


# the blocks a lock covers, asked after the commit that precedes its flush (so blocks
# that commit logged count); None: not known, write everything home
Covered = Callable[[], Iterable[int] | None]


class Dirtyable(Protocol):
    def to_blocks(self) -> dict[int, bytes]: ...

    def block_estimate(self) -> int: ...


class TransactionManager:
    def __init__(self, journal: Journal) -> None:
        self.journal = journal
        self.dirty: dict[int, Dirtyable] = {}
        self.started = 0.0
        self.last_change = 0.0            # when the last operation that wrote ended
        self.estimate = 0
        self.withdrawn: str | None = None
        # told once, when the filesystem withdraws (the fs ends every lock wait)
        self.on_withdraw: list[Callable[[str], None]] = []
        self.stats = {"commits": 0, "operations": 0}
        # set by the fs when it writes file data into blocks it just allocated: the
        # next commit must make that data durable before its commit block can be
        # (ordered data), so it flushes twice; otherwise once (see commit)
        self.fresh_data = False
        # a cluster mount: write everything home once nothing has changed for
        # IDLE_WRITEBACK (another node may want what we hold; one node: no need)
        self.idle_writeback = False
        self._limit = max(16, journal.max_transaction // LARGE_FRACTION)
        self._lock = trio.Lock()
        self._kick = trio.Event()         # wakes run_timer for a background commit
        self._background = False          # run_timer is running
        # set by the fs layer: snapshot / release of the allocator's quarantine
        self.quarantine_mark: Callable[[], Any] = lambda: None
        self.end_quarantine: Callable[[Any], None] = lambda mark: None

    # -- health ---------------------------------------------------------------
    def withdraw(self, reason: str) -> None:
        if self.withdrawn is None:
            self.withdrawn = reason
            log.error("clusterfs: withdrawing: %s; no more writes to disk", reason)
            for hook in self.on_withdraw:
                hook(reason)

    def check_writable(self) -> None:
        if self.withdrawn is not None:
            raise Withdrawn(f"filesystem withdrawn: {self.withdrawn}")

    # -- the running transaction ------------------------------------------------
    def add(self, obj: Dirtyable) -> None:
        """Mark obj dirty in the running transaction."""
        self.check_writable()
        if id(obj) not in self.dirty:
            if not self.dirty:
                self.started = time.monotonic()
            self.dirty[id(obj)] = obj
            self.estimate += obj.block_estimate()

    def is_dirty(self, obj: Dirtyable) -> bool:
        return id(obj) in self.dirty

    def discard(self, obj: Dirtyable) -> None:
        """obj's blocks were freed: do not write them."""
        self.dirty.pop(id(obj), None)

    async def end_operation(self) -> None:
        """Called after each metadata operation: commit if the transaction is big.

        The commit runs in the background (run_timer) so the operation that crossed
        the limit does not wait two device flushes (a create burst paid that every
        few hundred creates); only if the transaction keeps growing past twice the
        limit while a commit is under way does the operation wait (back-pressure;
        twice the limit is still half the journal)."""
        self.stats["operations"] += 1
        self.last_change = time.monotonic()
        if self.estimate > self._limit:
            if self._background and self.estimate <= 2 * self._limit:
                self._kick.set()
            else:
                await self.commit()

    async def commit(self, checkpoint: bool = False, covered: Covered | None = None) -> None:
        """Log every dirty object durably; just a device flush when nothing is dirty.
        With checkpoint=True also write everything home and empty the log; or, given
        `covered` (a lock going down), only the blocks it names, with a revoke record
        (`_write_home`).

        One device flush, after the commit block, when no file data went to newly
        allocated blocks since the last commit: a commit block that reached the disk
        without the copies it covers fails its checksum at replay, which then ends
        there, and that transaction was never reported durable. New data blocks need
        a flush before the commit block too: else a crash could leave a durable
        commit pointing a file at blocks that still hold whatever was there before
        (jbd2's ordered mode; its async_commit does without that flush).

        The journal's writes and flushes run in a worker thread, so requests keep
        being served;
        commits and checkpoints are serialised by one lock. Objects changed while a
        commit is in flight belong to the next transaction (their blocks were
        encoded when this one was captured). Blocks freed up to the capture leave
        quarantine only with checkpoint=True: the log is then checkpointed past their
        freeing."""
        self.check_writable()
        async with self._lock:
            self.check_writable()
            mark = self.quarantine_mark()
            try:
                await self._commit_running()
                emptied = checkpoint and await self._write_home(covered)
            except Exception as exc:
                # the disk refused a write or flush: nothing after this can be trusted
                self.withdraw(f"journal commit failed: {exc}")
                raise Withdrawn(f"filesystem withdrawn: {exc}") from exc
            if emptied:
                # Only a checkpoint made after this transaction was logged covers its
                # frees. begin_commit's own checkpoint (the log was full) runs before it
                # is written: releasing its frees then let a freed block be reused while
                # this transaction still held a copy of it (a tombstone) for the next
                # checkpoint to write home, over the block's new contents. A write-back
                # of some blocks (a lock going down) leaves the log and them as they are.
                self.end_quarantine(mark)

    async def _commit_running(self) -> None:
        """(Under self._lock.) Capture the running transaction and commit it."""
        blocks: dict[int, bytes] = {}
        for obj in list(self.dirty.values()):
            blocks.update(obj.to_blocks())
        self.dirty.clear()
        self.estimate = 0
        ordered, self.fresh_data = self.fresh_data, False
        # Every journal write waits for the queued data writes first, and a full log
        # checkpoints: never on the event loop (a commit's log writes used to wait
        # there for data queued meanwhile). A small commit is one io_uring chain the
        # loop awaits; anything else is one worker-thread hop.
        self.journal.stage(blocks)
        done, pending = await self.journal.log_without_thread(blocks, ordered)
        if not done:
            pending = await workers.run(self.journal.log_transaction, blocks, ordered)
        if pending is not None:
            self.journal.end_commit(pending, flushes=2 if ordered else 1)
            self.stats["commits"] += 1

    async def _write_home(self, covered: Covered | None) -> bool:
        """(Under self._lock, after a commit.) Write home what `covered` names, with a
        revoke record (Journal.write_back), or everything (a checkpoint) when no set is
        given or known, when the set is everything logged anyway, or when the revoke
        would not fit in the log. True if the log was emptied (a checkpoint)."""
        journal = self.journal
        if not journal.pending_home:
            return True
        wanted = covered() if covered is not None else None
        homes = journal.logged_among(wanted) if wanted is not None else None
        if homes is None or len(homes) == len(journal.pending_home) or \
                not journal.room_to_revoke(len(homes)):
            # home writes and two flushes: in a worker thread, like the commit's
            await workers.run(journal.checkpoint)
            return True
        if homes:
            await workers.run(journal.write_back, homes)   # (counted there)
        return False

    async def flush_for_demote(self, covered: Covered | None = None) -> None:
        """Before a lock goes down: everything this node changed committed, and what
        the lock covers (`covered`; everything when None) home and revoked in the
        journal, so the next holder reads the newest copy on disk and a replay of our
        journal never puts an older one over what it writes next (docs/journal.md).

        With nothing dirty, nothing logged that is not home yet and no commit under
        way, only queued data writes have to reach the device (the next holder reads
        them there); durability is not the point, so no device flush and no journal
        write. A demote of a lock this node only read under (a stat of another node's
        file) then costs no I/O at all."""
        self.check_writable()
        if self.quiet():
            await self._drain_data()
        else:
            await self.commit(checkpoint=True, covered=covered)

    async def flush_data(self) -> None:
        """Data writes on the device and the device cache flushed, no journal commit
        (fdatasync of an overwrite in place)."""
        self.check_writable()
        try:
            if not await self.journal.dev.flush_without_thread():
                await workers.run(self._drain_and_flush)
        except Exception as exc:
            self.withdraw(f"data write or flush failed: {exc}")
            raise Withdrawn(f"filesystem withdrawn: {exc}") from exc

    def _drain_and_flush(self) -> None:
        """(In a worker thread.) Queued data writes on the device, then its cache
        flushed: one thread hop for an fsync or fdatasync with no journal write, where
        a drain and a flush of their own cost two."""
        dev = self.journal.dev
        dev.drain()
        dev.flush()

    async def drain_data(self) -> None:
        """Queued data writes on the device (not flushed): what the next holder of a
        data lock reads there (fs: an overwrite in place's data lock going down)."""
        self.check_writable()
        await self._drain_data()

    async def _drain_data(self) -> None:
        """Let queued data writes finish, in a worker thread (the event loop never
        waits for the queue)."""
        dev = self.journal.dev
        if dev.behind_pending:
            try:
                await workers.run(dev.drain)
            except Exception as exc:
                self.withdraw(f"data write failed: {exc}")
                raise Withdrawn(f"filesystem withdrawn: {exc}") from exc

    async def close(self) -> None:
        """Unmount: commit, checkpoint, mark the journal clean."""
        await self.commit(checkpoint=True)
        async with self._lock:
            self.journal.close()

    async def run_timer(self) -> None:
        """Background task: commit a transaction that has waited COMMIT_INTERVAL, or
        one that end_operation found large."""
        self._background = True
        try:
            while True:
                await self._background_round()
        finally:
            self._background = False

    def journal_stats(self) -> dict[str, int]:
        """The journal's counters (commits, checkpoints, write-backs...), for status."""
        return dict(self.journal.stats)

    def committing(self) -> bool:
        """A commit or checkpoint is under way."""
        return self._lock.locked()

    def quiet(self) -> bool:
        """Nothing to write: nothing dirty, nothing logged that is not home yet, no
        commit under way (a demote now costs no I/O; see flush_for_demote)."""
        return not self.dirty and not self.journal.pending_home and not self._lock.locked()

    async def _background_round(self) -> None:
        with trio.move_on_after(COMMIT_INTERVAL / 4):
            await self._kick.wait()
        self._kick = trio.Event()
        if self.withdrawn is not None:
            return
        now = time.monotonic()
        try:
            if self.idle_writeback and not self.quiet() and \
                    now - self.last_change >= IDLE_WRITEBACK:
                # nothing changed for a while: write everything home, so a later
                # demote has nothing to do and a crash leaves little to replay
                await self.commit(checkpoint=True)
            elif self.dirty and (self.estimate > self._limit
                                 or now - self.started >= COMMIT_INTERVAL):
                await self.commit()
        except Withdrawn:
            pass           # logged by withdraw(); keep serving reads
