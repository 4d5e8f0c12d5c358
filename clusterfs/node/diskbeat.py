"""The disk heartbeat of a mounted node: membership's second path (DiskPath).

Every heartbeat interval, in a worker thread and through a device handle of its own
(O_DIRECT, so it sees the other hosts' writes and never waits behind the data path):
write this node's block (format/diskbeat.py) with the counter one higher, then read
every node's block. A node whose block changed within the failure timeout is alive on
the disk; one first seen now is presumed alive for a full timeout (we cannot know how
long it has been still); a STOPPED block (a clean leave) is not alive.

Membership asks `alive()`, `quorate_members()` and `own_ok()` (clusterfs.membership.
state.DiskPath): the quorum-disk tiebreak, and a joiner's check for a cluster running
out of its sight. The membership layer never touches the disk itself.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import trio

from clusterfs import workers
from clusterfs.errors import ClusterFSError
from clusterfs.format.block import BLOCK_SIZE
from clusterfs.format.diskbeat import (
    BEATING,
    DISKBEAT_BLOCKS,
    QUORATE,
    STOPPED,
    DiskBeat,
    beat_blkno,
    decode_beat,
    encode_beat,
)

log = logging.getLogger("clusterfs.diskbeat")
FIRST = DISKBEAT_BLOCKS[0]
SPAN = DISKBEAT_BLOCKS[-1] - FIRST + 1       # one read covers them all


class DiskHeartbeat:
    def __init__(self, dev: Any, node_ids: frozenset[int], node_id: int, interval: float,
                 timeout: float) -> None:
        self.dev = dev
        self.node_id = node_id
        self.interval = interval
        self.timeout = timeout
        self.blknos = {n: b for n in node_ids if (b := beat_blkno(node_ids, n)) is not None}
        self.membership: Any = None          # set by attach(): whose state we write
        self.counter = 0
        self.stopped = False
        self.written_at = -math.inf          # monotonic time of our last good write
        self.seen: dict[int, DiskBeat] = {}
        self.changed_at: dict[int, float] = {}
        self.errors = 0

    @classmethod
    def open(cls, path: str, node_ids: frozenset[int], node_id: int, interval: float,
             timeout: float) -> DiskHeartbeat:
        from clusterfs.storage import open_block_device

        dev = open_block_device(path)
        dev.bypass_page_cache()
        return cls(dev, node_ids, node_id, interval, timeout)

    def attach(self, membership: Any) -> None:
        self.membership = membership

    # -- what membership asks (DiskPath) ------------------------------------------------
    def alive(self) -> frozenset[int]:
        now = time.monotonic()
        return frozenset(n for n, b in self.seen.items()
                         if n != self.node_id and b.state == BEATING
                         and now - self.changed_at[n] <= self.timeout)

    def quorate_members(self) -> frozenset[int]:
        return frozenset(n for n in self.alive() if self.seen[n].flags & QUORATE)

    def own_ok(self) -> bool:
        # the others take us for dead a timeout after the last change they saw; stop
        # counting ourselves alive on the disk well before that
        return (self.node_id in self.blknos
                and time.monotonic() - self.written_at <= self.timeout / 2)

    # -- the loop ---------------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        task_status.started()
        while True:
            # a hung device must not hang membership: the read is abandoned, own_ok()
            # turns false, and the next round tries again
            with trio.move_on_after(self.timeout):
                await workers.run(self._round, abandon=True)
            await trio.sleep(self.interval)

    def _round(self) -> None:
        try:
            if not self.stopped:
                self._write(BEATING)
            self._read_all()
        except (ClusterFSError, OSError) as exc:
            self.errors += 1
            if self.errors in (1, 10) or self.errors % 100 == 0:
                log.warning("node %d: disk heartbeat failed (%d times): %s", self.node_id,
                            self.errors, exc)

    def _write(self, state: int) -> None:
        blk = self.blknos.get(self.node_id)
        m = self.membership
        if blk is None or m is None:
            return
        self.counter += 1
        flags = QUORATE if m.state == "member" and m.view.quorate else 0
        beat = DiskBeat(self.node_id, state, m.incarnation, m.view.generation, flags,
                        time.time_ns(), self.counter)
        self.dev.write(blk, encode_beat(beat, blk))
        self.written_at = time.monotonic()

    def _read_all(self) -> None:
        raw = self.dev.read(FIRST, SPAN)
        now = time.monotonic()
        for n, blk in self.blknos.items():
            off = (blk - FIRST) * BLOCK_SIZE
            try:
                beat = decode_beat(raw[off:off + BLOCK_SIZE], blk)
            except ClusterFSError:
                continue               # never written (mkfs zeroes it), or torn
            if beat.node != n:
                continue               # not this node's (a config that changed)
            old = self.seen.get(n)
            if old is None or (old.incarnation, old.counter, old.state) != (
                    beat.incarnation, beat.counter, beat.state):
                self.changed_at[n] = now
            self.seen[n] = beat

    async def stop(self) -> None:
        """Write a last STOPPED beat (a clean leave): we are not alive on the disk."""
        self.stopped = True
        try:
            await workers.run(self._write, STOPPED)
        except (ClusterFSError, OSError) as exc:
            log.warning("node %d: could not write the last disk heartbeat: %s",
                        self.node_id, exc)

    def statistics(self) -> dict[str, Any]:
        now = time.monotonic()
        return {"own_ok": self.own_ok(), "alive": sorted(self.alive()),
                "errors": self.errors,
                "seen": {n: {"state": b.state, "counter": b.counter, "gen": b.generation,
                             "quorate": bool(b.flags & QUORATE),
                             "age": round(now - self.changed_at[n], 3)}
                         for n, b in sorted(self.seen.items())}}

    def close(self) -> None:
        self.dev.close()
