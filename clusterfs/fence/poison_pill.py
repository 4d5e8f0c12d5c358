"""Disk poison-pill fencing, as SBD does it, for devices without reservations.

Each node has a slot on the shared disk: the heartbeat block of the journal slot it
claimed (clusterfs.format.heartbeat). The protocol:

1. Claim. Right after a node claims journal slot S (it holds ("journal", S) EX), and
   before it writes anything else to the device, it writes its node id and
   incarnation into heartbeat block S (`claim_slot`) and starts its watcher.
2. Watch. `PillWatcher` reads the slot every `interval` seconds. It calls
   `on_pill(reason)` once, and stops, when the slot holds a pill for this node's
   incarnation, when the slot was claimed by someone else, or when no read of it
   has succeeded for `timeout` seconds (unreadable, bad checksum, a read that hangs):
   a node that cannot see its slot cannot know it is not fenced. The mount withdraws
   in on_pill: the device refuses every later write at once.
3. Fence. `PoisonPillAgent.fence(N, gen, inc)` scans the heartbeat blocks for the
   slot(s) N's incarnation `inc` claimed, writes a pill (for that incarnation, from
   this node, with the generation) into each, reads it back, and then waits
   `msgwait` seconds before it returns: by then the victim's watcher has either read
   the pill or gone `timeout` without a good read, and called on_pill either way.

Timing: the watcher acts at most `timeout` after the pill lands (a read that starts
after the pill sees it; if none succeeds, the timeout fires: freshness is counted
from the *start* of the last good read), so msgwait must exceed timeout; the
defaults are timeout = 2 x interval and msgwait = 2 x timeout (1 s, 2 s, 4 s).
What on_pill cannot recall is a write already handed to the device: msgwait should
also exceed the longest a device write may take (on iSCSI, prefer scsi-pr).

A victim that holds no slot (it never claimed one: it died between joining and
claiming, or it is a lock-service node that never mounts) is rescanned once after
msgwait (a claim in flight lands meanwhile); if there is still none it is reported
fenced, with a warning: by step 1, a node that has not claimed has written nothing
and cannot claim a slot while its journal lock is held by recovery of it.

The device is any object with BlockDevice's `read(blkno)`, `write(blkno, data)` and
`flush()` (the fence layer never imports storage). The watcher should read through a
handle of its own (the mount opens the device a second time, read-only), so its
reads never wait behind the data path's queue.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Protocol

import trio

from clusterfs import workers
from clusterfs.errors import ClusterFSError, FenceError, StorageError
from clusterfs.format.block import BLOCK_SIZE
from clusterfs.format.heartbeat import (
    HeartbeatSlot,
    Pill,
    claimed,
    decode_slot,
    encode_slot,
    slot_blkno,
    with_pill,
)
from clusterfs.format.superblock import SUPERBLOCK_BLKNO, Superblock, decode_superblock

log = logging.getLogger(__name__)

DEFAULT_INTERVAL = 1.0


def default_timeout(interval: float) -> float:
    return 2 * interval


def default_msgwait(timeout: float) -> float:
    return 2 * timeout


class SlotDevice(Protocol):
    path: str

    def read(self, blkno: int, count: int = 1) -> bytes: ...
    def write(self, blkno: int, data: bytes | bytearray | memoryview) -> None: ...
    def flush(self) -> None: ...


def read_superblock(dev: SlotDevice) -> Superblock:
    return decode_superblock(dev.read(SUPERBLOCK_BLKNO))


def read_slots(dev: SlotDevice, sb: Superblock) -> list[HeartbeatSlot | None]:
    """Every heartbeat slot (one read); None for a block that does not decode."""
    raw = dev.read(sb.hb_start, sb.journal_count)
    out: list[HeartbeatSlot | None] = []
    for s in range(sb.journal_count):
        blk = slot_blkno(sb.hb_start, s)
        try:
            out.append(decode_slot(raw[s * BLOCK_SIZE : (s + 1) * BLOCK_SIZE], blk))
        except ClusterFSError:
            out.append(None)
    return out


def find_slots(dev: SlotDevice, sb: Superblock, node_id: int,
               incarnation: int | None = None) -> list[int]:
    """The slots node_id claimed (in its life `incarnation`, if given)."""
    return [s for s, hs in enumerate(read_slots(dev, sb))
            if hs is not None and hs.owned_by(node_id, incarnation)]


def claim_slot(dev: SlotDevice, sb: Superblock, slot: int, node_id: int,
               incarnation: int) -> HeartbeatSlot:
    """Write node_id's claim into heartbeat slot `slot` (the journal slot it holds) and
    make it durable. FenceError if the slot already holds a pill for this very
    incarnation (it was fenced before it got here). A block that does not decode is
    simply overwritten: it is ours now."""
    if not 0 <= slot < sb.journal_count:
        raise FenceError(f"heartbeat slot {slot} out of range 0..{sb.journal_count - 1}")
    blk = slot_blkno(sb.hb_start, slot)
    try:
        old = decode_slot(dev.read(blk), blk)
    except ClusterFSError:
        old = HeartbeatSlot()
    if old.pill is not None and old.pill.node == node_id \
            and old.pill.incarnation == incarnation:
        raise FenceError(f"heartbeat slot {slot}: node {node_id} (incarnation "
                         f"{incarnation:#x}) was fenced by node {old.pill.fencer}")
    new = claimed(old, node_id, incarnation, time.time_ns())
    dev.write(blk, encode_slot(new, blk))
    dev.flush()
    return new


class PoisonPillAgent:
    """Fence a node by a pill in its heartbeat slot, then wait msgwait.

    dev: the shared device (opened at start-up); sb: its superblock (read here if
    not given). node_id: this node, named in the pills it writes."""

    def __init__(self, dev: SlotDevice, node_id: int, *, msgwait: float,
                 sb: Superblock | None = None) -> None:
        self.dev = dev
        self.node_id = node_id
        self.msgwait = msgwait
        self.sb = sb if sb is not None else read_superblock(dev)
        self.calls: list[tuple[int, int]] = []
        self.pills = 0

    async def fence(self, node_id: int, generation: int,
                    incarnation: int | None = None) -> None:
        self.calls.append((node_id, generation))
        if node_id == self.node_id:
            raise FenceError(f"node {node_id}: refusing to fence this node itself")
        slots = await workers.run(self._deliver, node_id, generation, incarnation)
        if not slots:
            # nothing claimed: a claim in flight lands within msgwait, else none comes
            await trio.sleep(self.msgwait)
            slots = await workers.run(self._deliver, node_id, generation, incarnation)
            if not slots:
                log.warning("gen %d: node %d counted fenced: it holds no heartbeat slot "
                            "on %s (never claimed one, so it wrote nothing there)",
                            generation, node_id, self.dev.path)
                return
        log.warning("gen %d: fencing node %d: pill written in slot(s) %s of %s; waiting "
                    "%.1f s (msgwait)", generation, node_id, slots, self.dev.path,
                    self.msgwait)
        await trio.sleep(self.msgwait)
        log.warning("gen %d: node %d fenced: its watcher has had msgwait to act on the "
                    "pill", generation, node_id)

    def _deliver(self, node_id: int, generation: int, incarnation: int | None) -> list[int]:
        """Write a pill into every slot node_id's incarnation claimed; the slots."""
        sb = self.sb
        try:
            found = [(s, hs) for s, hs in enumerate(read_slots(self.dev, sb))
                     if hs is not None and hs.owned_by(node_id, incarnation)]
            for s, hs in found:
                blk = slot_blkno(sb.hb_start, s)
                pill = Pill(node_id, hs.incarnation, self.node_id, generation,
                            time.time_ns())
                self.dev.write(blk, encode_slot(with_pill(hs, pill), blk))
                self.dev.flush()
                back = decode_slot(self.dev.read(blk), blk)
                if back.pill != pill:
                    raise FenceError(f"node {node_id}: slot {s} of {self.dev.path}: the "
                                     "pill did not stick (read back differs)")
                self.pills += 1
        except FenceError:
            raise
        except ClusterFSError as exc:
            raise FenceError(f"node {node_id}: cannot write its pill: {exc}") from exc
        return [s for s, _hs in found]

    def statistics(self) -> dict[str, object]:
        return {"agent": "poison-pill", "fenced": len(self.calls), "pills": self.pills,
                "msgwait": self.msgwait, "device": self.dev.path}


async def _read_in_thread(fn: Callable[[], bytes]) -> bytes:
    """fn() in a worker thread, abandoned (left to finish on its own) if cancelled."""
    return await workers.run(fn, abandon=True)


class PillWatcher:
    """Read this node's heartbeat slot every `interval`; call `on_pill(reason)` once
    (and return) on a pill for this incarnation, a slot claimed by another, or no
    good read for `timeout` seconds. Run it as a trio task: `nursery.start_soon(
    watcher.run)`. A read that hangs is abandoned in its worker thread."""

    def __init__(self, dev: SlotDevice, blkno: int, node_id: int, incarnation: int, *,
                 on_pill: Callable[[str], object], interval: float = DEFAULT_INTERVAL,
                 timeout: float | None = None) -> None:
        self.dev = dev
        self.blkno = blkno
        self.node_id = node_id
        self.incarnation = incarnation
        self.on_pill = on_pill
        self.interval = interval
        self.timeout = timeout if timeout is not None else default_timeout(interval)
        self.reads = 0
        self.bad_reads = 0
        self.fired: str | None = None
        self.last_error: str | None = None
        self.fresh_at = time.monotonic()      # start of the last good read (wall time)
        self.guard_reads = 0
        self._guard_lock = threading.Lock()

    @classmethod
    def for_slot(cls, dev: SlotDevice, sb: Superblock, slot: int, node_id: int,
                 incarnation: int, **kw) -> PillWatcher:
        return cls(dev, slot_blkno(sb.hb_start, slot), node_id, incarnation, **kw)

    def check(self, hs: HeartbeatSlot) -> str | None:
        """Why this slot means we must stop writing, or None."""
        p = hs.pill
        if p is not None and p.targets(self.node_id, self.incarnation):
            return (f"poison pill from node {p.fencer} (generation {p.generation}) in "
                    f"heartbeat block {self.blkno}: this node was fenced")
        if not hs.owned_by(self.node_id, self.incarnation):
            who = "nobody" if hs.owner is None else f"node {hs.owner} ({hs.incarnation:#x})"
            return (f"heartbeat block {self.blkno} is claimed by {who}, not by this node: "
                    "this node was fenced")
        return None

    async def run(self) -> None:
        fresh = trio.current_time()          # start of the last good read
        while self.fired is None:
            started = trio.current_time()
            started_wall = time.monotonic()
            reason = None
            deadline = fresh + self.timeout
            if started > deadline:
                # This loop did not run at all for a timeout (the process was stopped
                # or starved), which says nothing about the slot: read it before
                # deciding. A fencer's pill is then what stops us, and says so; giving
                # up unread named the wrong cause ("not read"). The read has an
                # interval, as any other.
                deadline = started + self.interval
            with trio.move_on_at(deadline):
                try:
                    raw = await _read_in_thread(lambda: self.dev.read(self.blkno))
                    hs = decode_slot(raw, self.blkno)
                except Exception as exc:  # noqa: BLE001 - any failure: the slot is unread
                    self.bad_reads += 1
                    self.last_error = str(exc) or type(exc).__name__
                else:
                    self.reads += 1
                    fresh = started
                    self.fresh_at = max(self.fresh_at, started_wall)
                    reason = self.check(hs)
            if reason is None and trio.current_time() >= fresh + self.timeout:
                reason = (f"heartbeat block {self.blkno} not read for {self.timeout:g} s "
                          f"({self.last_error or 'the read did not return'}): cannot "
                          "tell whether this node was fenced")
            if reason is not None:
                self._fire(reason)
                return
            await trio.sleep(min(self.interval,
                                 max(0.0, fresh + self.timeout - trio.current_time())))

    def check_writable(self) -> None:
        """The device's write guard (BlockAddressed.guard_writes), run before every
        write and flush, in whatever thread makes it: StorageError once the watcher
        fired; and when the last good read of the slot started more than `stale`
        seconds ago (between interval and timeout: the node was stopped or starved, and
        a fencer may have written a pill meanwhile and gone on after msgwait), the slot
        is read again here first, so a node that wakes up after its fence writes
        nothing before it has seen the pill. (A stop between this check and the write
        itself is the window left: SBD closes it with a hardware watchdog.)"""
        stale = (self.interval + self.timeout) / 2
        if self.fired is None and time.monotonic() - self.fresh_at > stale:
            with self._guard_lock:
                if time.monotonic() - self.fresh_at > stale:
                    self._read_now()
        if self.fired is not None:
            raise StorageError(f"write refused: {self.fired}")

    def _read_now(self) -> None:
        started = time.monotonic()
        self.guard_reads += 1
        try:
            hs = decode_slot(self.dev.read(self.blkno), self.blkno)
        except ClusterFSError as exc:
            self._fire(f"heartbeat block {self.blkno} unreadable before a write ({exc}): "
                       "cannot tell whether this node was fenced")
            return
        reason = self.check(hs)
        if reason is not None:
            self._fire(reason)
        else:
            self.fresh_at = max(self.fresh_at, started)

    def _fire(self, reason: str) -> None:
        if self.fired is not None:
            return
        self.fired = reason
        log.error("node %d: %s; stopping all writes", self.node_id, reason)
        self.on_pill(reason)

    def statistics(self) -> dict[str, object]:
        return {"reads": self.reads, "bad_reads": self.bad_reads, "fired": self.fired,
                "guard_reads": self.guard_reads,
                "interval": self.interval, "timeout": self.timeout}
