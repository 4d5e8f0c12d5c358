"""Glocks: this node's cached hold on one lock resource (the GFS2 glock life).

A glock takes the resource's lock from the LockService the first time the node
needs it and keeps it after use, so the next operation needs no round trip.

The rules, each there because the real DLM yields (a lock service that grants
at once hides every one of these races):

- One request in flight per glock. Every call into the lock service for a
  glock (lock, convert, the demote's convert or unlock) runs under the glock's
  `mutex`; local users that need more than the cached mode queue behind it, so
  two concurrent first uses take one DLM lock, not two.
- Demote to what the other node needs. The blocking callback says which mode
  the other node asked for; a holder of EX asked for PR goes down to PR
  (keeping its clean cache), asked for anything stronger it unlocks.
- A minimum hold time. A demote waits until the glock has been held its
  hold time since its grant, and local users keep taking it until then, so
  two nodes taking turns on one lock each get some work done per round trip
  instead of bouncing it. The hold time adapts per glock (as GFS2's does): a
  hold in which local users took the glock after the other node asked for it
  makes the next one longer by `hold_step`, up to `max_hold`; one in which
  nobody here wanted it any more makes the next shorter, back towards
  `min_hold`. Two nodes both working on one lock then hand it over less often,
  and a lock merely visited by others (or taken in strict turns) stays quick to
  get. Once a demote is past its hold (`going_down`) no local user gets in,
  whatever the clock says, until the lock is down.
- Conversion deadlocks stay inside. Two nodes holding PR that both convert to
  EX close a cycle; the DLM fails one conversion with ConversionDeadlock. That
  side flushes and drops its lock, waits a moment and asks again from nothing.
- A blocking callback is never dropped: one that arrives before `start()` is
  kept and run once the manager has its nursery.
- A bounded cache. Past `max_cached` glocks, the least recently used idle ones
  of the kinds in `shrinkable` go down to nothing as if another node had asked
  for them (the same demote: flush, drop what they cover, tell the kernel), and
  their Glock objects are forgotten (as GFS2's glock LRU and shrinker). Without
  it a node keeps a lock, a lock record and a cached inode for every file it
  ever touched: memory (locked by mlockall) and every full garbage collection
  grow with the number of files.

Before a glock goes down, its kind's demote callback runs (flush what the lock
covers, drop cached state, tell the kernel to forget) with the mode it is going
to; only then is the lock converted or released.

Operations acquire every glock they need up front, in a fixed order (sorted by
name), then run their body without awaiting: bodies are atomic with respect to
one another on this node, and ordering prevents deadlock between nodes.
"""

from __future__ import annotations

import logging
import random
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from typing import Any, Protocol

import trio

from clusterfs.dlm.interface import (
    FULL_RANGE,
    ConversionDeadlock,
    Lock,
    LockService,
    Mode,
    ResourceName,
)
from clusterfs.errors import ClusterFSError, WouldBlock

log = logging.getLogger(__name__)
DemoteCallback = Callable[["Glock", Mode], Awaitable[None] | None]
GrantCallback = Callable[["Glock"], None]
MIN_HOLD = 0.02          # seconds; docs/locking.md has the measurements behind it
MAX_HOLD = 0.2           # the longest a contended glock's hold time grows to
HOLD_STEP = 0.02         # what one contended hold adds to the next (one not contended takes)
IDLE_SHARE = 1.0         # seconds an unused, clean EX glock is kept before going to PR
SHARE_BATCH = 256        # EX glocks looked at, and sent down, per event-loop step
DEADLOCK_BACKOFF = 0.01  # up to this long (random) before asking again after a deadlock
WARM_IN_FLIGHT = 32      # lock requests warm() keeps in flight at once
MAX_CACHED = 50_000      # glocks kept before the least recently used idle ones go
SHRINK_TO = 0.9          # a shrink goes down to this fraction of max_cached
SHRINK_IN_FLIGHT = 256   # demotes a shrink has in flight at once
SHRINK_PAUSE = 0.1       # seconds before a shrink that stopped short looks again
SHRINK_LOOK = 4          # idle glocks a shrink looks at per one it lets go, at most


class Gate(Protocol):
    def is_open(self) -> bool: ...

    async def wait_open(self) -> None: ...


class Glock:
    def __init__(self, name: ResourceName, hold_time: float = MIN_HOLD) -> None:
        self.name = name
        self.hold_time = hold_time        # adapts: GlockManager._adapt_hold_time
        self.lock: Lock | None = None
        self.holders = 0
        # made only when a task waits for the holders to go (wait_idle): an Event for
        # every 0 -> 1 of `holders` was a tenth of a create's CPU on a cluster mount
        self._idle: trio.Event | None = None
        self.mutex = trio.Lock()          # one lock-service request in flight
        self.demote_to: Mode | None = None  # a demote is pending, down to this mode
        self.demoted = trio.Event()       # set when the pending demote is done
        self.granted_at = 0.0
        self.released_at = 0.0            # when the last local user let go
        self.demotes = 0
        self.requesting: Mode | None = None   # the mode a request in flight asks for
        self.asked_at = 0.0               # when another node last asked us to go down
        self.going_down = False           # a demote is past the hold: no new local users
        self.evicting = False             # the shrinker's demote: forget it once down
        self.draining = False             # a failed conversion waits for its holders
        # set when a local user waits behind the pending demote for a mode stronger
        # than the one held: the rest of the hold time would serve no one (_demote)
        self.outgrown = trio.Event()

    async def wait_idle(self) -> None:
        """Until no local task holds it."""
        while self.holders:
            if self._idle is None:
                self._idle = trio.Event()
            await self._idle.wait()

    def became_idle(self) -> None:
        """(holders just went to 0) Wake every wait_idle."""
        if self._idle is not None:
            self._idle.set()
            self._idle = None

    @property
    def mode(self) -> Mode | None:
        return self.lock.mode if self.lock is not None else None

    def usable_for(self, mode: Mode) -> bool:
        """Held in `mode` or better, and no demote pending or still inside the hold
        time (local users go on until it is over): take it without waiting."""
        return self.lock is not None and self.lock.mode >= mode and not self.draining and (
            self.demote_to is None or (
                not self.going_down and time.monotonic() < self.granted_at + self.hold_time))

    def describe(self) -> dict[str, Any]:
        return {"name": list(self.name), "mode": self.mode.name if self.mode is not None
                else None, "holders": self.holders,
                "requesting": self.requesting.name if self.requesting is not None else None,
                "demote_to": self.demote_to.name if self.demote_to is not None else None,
                "held_for": round(time.monotonic() - self.granted_at, 3)
                if self.lock is not None else None, "demotes": self.demotes,
                "hold_time": round(self.hold_time, 3)}


def demote_target(wanted: Mode) -> Mode:
    """What to keep when another node wants `wanted`: PR if it can share it, else nothing."""
    return Mode.PR if wanted <= Mode.PR else Mode.NL


class GlockManager:
    def __init__(self, locks: LockService, min_hold: float = MIN_HOLD,
                 max_hold: float | None = None, hold_step: float = HOLD_STEP,
                 max_cached: int = MAX_CACHED) -> None:
        self.locks = locks
        self.min_hold = min_hold
        # min_hold 0 (hand over at once: the in-process tests) keeps it fixed unless
        # a max_hold is given
        if max_hold is None:
            max_hold = MAX_HOLD if min_hold > 0 else 0.0
        self.max_hold = max(min_hold, max_hold)
        self.hold_step = hold_step
        self.glocks: dict[ResourceName, Glock] = {}
        self.demote_callbacks: dict[str, DemoteCallback] = {}   # by resource kind
        self.grant_callbacks: dict[str, GrantCallback] = {}
        self._nursery: trio.Nursery | None = None
        self._early: list[Glock] = []     # demotes asked for before start()
        # set by a cluster mount: no lock is used while it is closed (a view change,
        # no quorum, a departed node's journal not yet replayed; cache/recovery.py)
        self.gate: Gate | None = None
        self.stats = {"acquired": 0, "cached_hits": 0, "demoted": 0, "down_converted": 0,
                      "deadlocks_retried": 0, "shared_when_idle": 0, "evicted": 0}
        # the bounded cache (run_shrinker): idle glocks by last use, oldest first, of
        # the kinds that may be let go while nobody asks for them
        self.max_cached = max_cached
        self.shrinkable: set[str] = set()
        self._lru: OrderedDict[ResourceName, Glock] = OrderedDict()
        # the fs's say on whether a glock can go without a journal flush; one that
        # cannot waits for a later shrink (the journal is emptied now and then anyway)
        self.can_let_go: Callable[[Glock], bool] | None = None
        # and its way to make them able to: write the journal home (one flush for all)
        self.make_room: Callable[[], Awaitable[None]] | None = None
        self._over_limit = trio.Event()
        # kinds whose EX glocks go down to PR by themselves once unused for a while
        # (run_idle_sharing), and the EX glocks of those kinds held now
        self.share_when_idle: set[str] = set()
        self._exclusive: dict[ResourceName, Glock] = {}
        # kinds locked by byte range (ranged()): chunk size by kind
        self._chunk_bytes: dict[str, int] = {}
        # set by fail(): every wait for a glock, and every later acquire, ends with it
        self.failed: ClusterFSError | None = None

    def start(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        for glock in self._early:
            nursery.start_soon(self._demote, glock)
        self._early.clear()

    def on_demote(self, kind: str, callback: DemoteCallback) -> None:
        self.demote_callbacks[kind] = callback

    def ranged(self, kind: str, chunk_bytes: int) -> None:
        """Glocks of `kind` are named (kind, *resource, chunk) and each holds a DLM
        lock on the resource (kind, *resource) over bytes [chunk * chunk_bytes,
        (chunk + 1) * chunk_bytes): one DLM resource per file, and two nodes holding
        disjoint chunks of it both hold EX at once. A glock caches one whole chunk,
        so the cache and the demote logic stay one lock per glock."""
        self._chunk_bytes[kind] = chunk_bytes

    def _dlm_target(self, name: ResourceName) -> tuple[ResourceName, tuple[int, int]]:
        """The DLM resource and byte range a glock locks."""
        size = self._chunk_bytes.get(str(name[0]))
        if size is None:
            return name, FULL_RANGE
        chunk = name[-1]
        return name[:-1], (chunk * size, (chunk + 1) * size - 1)

    def on_grant(self, kind: str, callback: GrantCallback) -> None:
        """Call `callback(glock)` when a glock of `kind` is granted afresh (not held
        before): whatever the cache kept of it from before may be stale now."""
        self.grant_callbacks[kind] = callback

    async def acquire(self, wanted: Iterable[tuple[ResourceName, Mode]]) -> list[Glock]:
        """Hold every (name, mode), in sorted order; release with release(). A glock
        already cached in a sufficient mode is taken without awaiting (the fast path)."""
        if self.failed is not None:
            raise self.failed
        merged: dict[ResourceName, Mode] = {}
        for name, mode in wanted:
            if merged.get(name, Mode.NL) < mode:
                merged[name] = mode
        taken: list[Glock] = []
        try:
            for name in sorted(merged):
                mode = merged[name]
                glock = self.hold_if_cached(name, mode)
                if glock is None:
                    glock = await self._acquire(name, mode)
                taken.append(glock)
        except BaseException:
            self.release(taken)
            raise
        return taken

    async def warm(self, wanted: Iterable[tuple[ResourceName, Mode]],
                   in_flight: int = WARM_IN_FLIGHT, at_once: bool = False) -> None:
        """Bring glocks into the cache, up to `in_flight` requests at a time, holding
        none of them after: a listing of another node's directory then waits one
        round trip per batch, not one per entry. Each is taken and let go on its own,
        so no two are held at once and the sorted order that keeps acquire() free of
        deadlock is not needed. Best effort: a glock that could not be taken (or was
        demoted again meanwhile) is left to the caller's acquire().

        at_once: only what needs no wait for another node or for a demote here (the
        lock service's try): a demote that warms (fs: a directory's new inodes) must
        not wait on a lock whose holder may be waiting for that very demote."""
        todo = [(name, mode) for name, mode in wanted
                if not self.cached_for(name, mode)]
        if not todo:
            return
        left = iter(todo)

        async def worker() -> None:
            # (`in_flight` of these take the requests one after another: a task and a
            # limiter's round per lock cost as much as the lock request itself)
            for name, mode in left:
                try:
                    if at_once:
                        glock = await self._acquire_at_once(name, mode)
                        if glock is not None:
                            self.release([glock])
                    else:
                        self.release(await self.acquire([(name, mode)]))
                except ClusterFSError as exc:   # nothing escapes the nursery but
                    log.debug("glock %s: not warmed: %s", name, exc)   # cancellation

        # a DLM sends the requests started together as one message per master, and
        # the master answers them the same way (Lockspace.batched)
        with self.locks.batched():
            async with trio.open_nursery() as nursery:
                for _ in range(min(in_flight, len(todo))):
                    nursery.start_soon(worker)

    def warm_soon(self, wanted: list[tuple[ResourceName, Mode]],
                  then: Callable[[ResourceName], None]) -> None:
        """warm() in the background (nobody waits for it), then call `then(name)` for
        each of `wanted` cached in its mode by then, holding it meanwhile. Best effort:
        `then` is not called for a lock that could not be taken (or no nursery yet)."""
        if self._nursery is not None and self.failed is None and wanted:
            self._nursery.start_soon(self._warm_then, wanted, then)

    async def _warm_then(self, wanted: list[tuple[ResourceName, Mode]],
                         then: Callable[[ResourceName], None]) -> None:
        await self.warm(wanted)
        for name, mode in wanted:
            glock = self.hold_if_cached(name, mode)
            if glock is None:
                continue
            try:
                then(name)
            except ClusterFSError as exc:       # (a background task: nothing may escape)
                log.debug("glock %s: warmed, but %s", name, exc)
            finally:
                self.release([glock])

    async def _acquire_at_once(self, name: ResourceName, mode: Mode) -> Glock | None:
        """Hold `name` in `mode` if it is cached so, or if the lock service grants a
        fresh request at once; else None, having waited for nobody."""
        glock = self.hold_if_cached(name, mode)
        if glock is not None or self.failed is not None or \
                (self.gate is not None and not self.gate.is_open()):
            return glock
        glock = self._glock(name)
        if glock.lock is not None or glock.demote_to is not None or glock.mutex.locked():
            return None          # (a conversion, a demote or a request under way)
        async with glock.mutex:
            if glock.lock is not None or glock.demote_to is not None or \
                    self.glocks.get(name) is not glock:
                return None
            if not await self._request(glock, mode, try_=True):
                return None
            if self.gate is not None and not self.gate.is_open():
                return None
            self._hold(glock)
            return glock

    def hold_if_cached(self, name: ResourceName, mode: Mode) -> Glock | None:
        """Hold `name` if that needs no wait (cached in `mode` or better, no demote past
        its hold, locking open), else None; release() it. Taking a lock this way while
        holding others cannot deadlock: it never waits, so the sorted order acquire()
        keeps does not apply."""
        glock = self.glocks.get(name)
        if glock is None or not glock.usable_for(mode) or \
                (self.gate is not None and not self.gate.is_open()):
            return None
        self._hold(glock)
        self.stats["cached_hits"] += 1
        return glock

    def cached_for(self, name: ResourceName, mode: Mode) -> bool:
        """Whether `name` is cached here in `mode` or better, usable without a wait."""
        glock = self.glocks.get(name)
        return glock is not None and glock.usable_for(mode)

    def release(self, taken: list[Glock]) -> None:
        for glock in taken:
            glock.holders -= 1
            if glock.holders == 0:
                glock.released_at = time.monotonic()
                glock.became_idle()
                self._lru[glock.name] = glock      # (re)enters as the newest
                self._lru.move_to_end(glock.name)

    @asynccontextmanager
    async def hold(self, wanted: Iterable[tuple[ResourceName, Mode]]):
        """Hold every (name, mode) for the body (see acquire)."""
        taken = await self.acquire(wanted)
        try:
            yield
        finally:
            self.release(taken)

    def _hold(self, glock: Glock) -> None:
        if glock.holders == 0:
            self._lru.pop(glock.name, None)
        glock.holders += 1

    async def _acquire(self, name: ResourceName, mode: Mode) -> Glock:
        while True:
            # fetched again on every round: a glock the shrinker let go while we
            # waited is forgotten, and a new one stands for the resource
            glock = self._glock(name)
            if self.failed is not None:
                raise self.failed
            if self.gate is not None and not self.gate.is_open():
                await self.gate.wait_open()
                continue
            if glock.demote_to is not None:
                if glock.mode is None or glock.mode < mode:
                    glock.outgrown.set()     # (our users cannot use what we keep)
                await glock.demoted.wait()   # the other node first: it asked before us
                continue
            async with glock.mutex:
                if glock.demote_to is not None or self.glocks.get(name) is not glock:
                    continue
                if not await self._request(glock, mode):
                    continue
                if self.gate is not None and not self.gate.is_open():
                    continue                 # granted across a view change: wait first
                self._hold(glock)            # before the mutex goes: no demote slips in
                return glock

    def _glock(self, name: ResourceName) -> Glock:
        glock = self.glocks.get(name)
        if glock is None:
            glock = self.glocks[name] = Glock(name, self.min_hold)
            if len(self.glocks) > self.max_cached:
                self._over_limit.set()
        return glock

    async def _request(self, glock: Glock, mode: Mode, try_: bool = False) -> bool:
        """Get `mode` on the glock (under its mutex); False to try again (try_: or
        not granted at once)."""
        if glock.lock is not None and glock.lock.mode >= mode:
            return True
        glock.requesting = mode
        try:
            if glock.lock is None:
                resource, byte_range = self._dlm_target(glock.name)
                try:
                    glock.lock = await self.locks.lock(
                        resource, mode, range=byte_range, try_=try_,
                        on_blocking=lambda m, g=glock: self._blocking(g, m))
                except WouldBlock:
                    return False
                granted = self.grant_callbacks.get(str(glock.name[0]))
                if granted is not None:
                    granted(glock)
            else:
                await self.locks.convert(glock.lock, mode)
        except ConversionDeadlock:
            # both of us hold PR and want EX: give ours up entirely and ask afresh, once
            # no local task holds it any more (letting it go under a reader let another
            # node rewrite the blocks it was reading: a torn directory leaf withdraws)
            self.stats["deadlocks_retried"] += 1
            log.debug("glock %s: conversion deadlock; dropping and asking again", glock.name)
            await self._drain_holders(glock)
            await self._go_down(glock, Mode.NL)
            await trio.sleep(random.random() * DEADLOCK_BACKOFF)
            return False
        finally:
            glock.requesting = None
        glock.granted_at = time.monotonic()
        self.stats["acquired"] += 1
        if mode == Mode.EX and str(glock.name[0]) in self.share_when_idle:
            self._exclusive[glock.name] = glock
        return True

    @staticmethod
    async def _drain_holders(glock: Glock) -> None:
        """Until no local task holds `glock`; none may start holding it meanwhile."""
        glock.draining = True
        try:
            await glock.wait_idle()
        finally:
            glock.draining = False

    def fail(self, error: ClusterFSError) -> None:
        """The node withdrew: a demote of ours never ends (it gives nothing back that
        may be stale), so an operation waiting behind one would wait for ever. Wake
        every such wait, and end it and every later acquire with `error`."""
        self.failed = error
        for glock in self.glocks.values():
            glock.demoted.set()

    def _blocking(self, glock: Glock, wanted: Mode, asked: bool = True) -> None:
        """The lock service: another node waits for `wanted`. Never dropped.
        (asked=False: the shrinker's own demote, which no other node waits for.)"""
        target = demote_target(wanted)
        if glock.demote_to is not None:
            glock.demote_to = min(glock.demote_to, target)
            return
        if asked:
            glock.asked_at = time.monotonic()
        glock.demote_to = target
        glock.demoted = trio.Event()
        glock.outgrown = trio.Event()
        if self._nursery is None:
            self._early.append(glock)
        else:
            self._nursery.start_soon(self._demote, glock)

    @staticmethod
    def _wanted_while_asked(glock: Glock) -> bool:
        """At the end of the hold: did local users take the glock after the other node
        asked for it (both sides want it), or did nobody here want it meanwhile (a
        node that used it once, or two nodes taking strict turns)?"""
        return glock.holders > 0 or glock.released_at > glock.asked_at

    def _adapt_hold_time(self, glock: Glock, contended: bool) -> None:
        """For the next tenure: longer when contended (each side gets more done per
        turn), shorter otherwise (hand it over sooner). Only once the glock is down:
        usable_for() lets local users in while granted_at + hold_time is ahead, so a
        hold time grown during the demote would let them change what the demote is
        flushing, and hand the lock over with their changes unwritten."""
        if contended:
            glock.hold_time = min(self.max_hold, glock.hold_time + self.hold_step)
        else:
            glock.hold_time = max(self.min_hold, glock.hold_time - self.hold_step)

    async def _demote(self, glock: Glock) -> None:
        """After the minimum hold time and once no local user holds it: flush what the
        lock covers, then convert down or release.

        The hold ends early when a local user comes to wait for a stronger mode than
        the one held (`outgrown`): a node holding PR for a lookup whose create then
        needs EX kept its PR, unused, for the whole hold while the other node's EX
        request waited for it (two nodes creating in one directory lost about a
        third of their time that way)."""
        try:
            async with glock.mutex:
                wait = glock.granted_at + glock.hold_time - time.monotonic()
                if wait > 0:
                    with trio.move_on_after(wait):
                        await glock.outgrown.wait()
                glock.going_down = True
                contended = self._wanted_while_asked(glock)
                await glock.wait_idle()
                # A blocking callback during _go_down (another node now wants more:
                # EX after our EX->PR for a reader) lowers demote_to; the DLM tells us
                # only once, so go down again rather than lose it.
                while True:
                    target = glock.demote_to
                    assert target is not None
                    if glock.lock is None or glock.lock.mode <= target:
                        break
                    await self._go_down(glock, target)
                self._adapt_hold_time(glock, contended)
                if glock.evicting and glock.lock is None:
                    self._forget(glock)
        finally:
            glock.evicting = False
            glock.going_down = False
            glock.demote_to = None
            glock.demoted.set()

    def _forget(self, glock: Glock) -> None:
        """Drop a glock whose lock is gone (under its mutex, so no request of ours is
        in flight): a later user makes a new one and asks the lock service afresh."""
        if glock.holders == 0 and self.glocks.get(glock.name) is glock:
            del self.glocks[glock.name]
            self._lru.pop(glock.name, None)
            self._exclusive.pop(glock.name, None)
            self.stats["evicted"] += 1

    async def run_shrinker(self) -> None:
        """Background task: whenever more than max_cached glocks are cached, let the
        least recently used idle ones of the shrinkable kinds go (see the module doc),
        down to SHRINK_TO of the limit."""
        while True:
            if len(self.glocks) <= self.max_cached:
                await self._over_limit.wait()
            self._over_limit = trio.Event()
            target = int(self.max_cached * SHRINK_TO)
            await self.shrink(target)
            if len(self.glocks) > self.max_cached and self.make_room is not None:
                # most of what is left has changes in the journal not yet home: write
                # it home once (the fs's checkpoint), and those can go without one each
                await self.make_room()
                await self.shrink(target)
            if len(self.glocks) > self.max_cached:
                # what is left is in use: look again in a while, not at every new glock
                await trio.sleep(SHRINK_PAUSE)

    async def shrink(self, target: int) -> int:
        """Demote idle glocks, least recently used first, until at most `target` are
        cached or none is left to let go; returns how many were let go."""
        evicted = 0
        while len(self.glocks) > target:
            batch = self._eviction_batch(min(SHRINK_IN_FLIGHT, len(self.glocks) - target))
            if not batch:
                break
            for glock in batch:
                glock.evicting = True
                self._blocking(glock, Mode.EX, asked=False)
            for glock in batch:
                await glock.demoted.wait()
            evicted += len(batch)
        return evicted

    def _eviction_batch(self, count: int) -> list[Glock]:
        """Up to `count` of the oldest idle glocks that nothing is using, asking for
        or demoting. Those in use met on the way leave the LRU (they re-enter when next
        released); those the fs cannot let go without a flush go back to its young end."""
        batch: list[Glock] = []
        later: list[Glock] = []
        looked = 0
        while self._lru and len(batch) < count and looked < SHRINK_LOOK * count:
            looked += 1
            name, glock = self._lru.popitem(last=False)
            if glock.holders or glock.requesting is not None or \
                    glock.demote_to is not None or self.glocks.get(name) is not glock:
                continue
            if str(name[0]) not in self.shrinkable:
                continue
            if glock.lock is None:           # never granted or already down: just forget
                self._forget(glock)
                continue
            if self.can_let_go is not None and not self.can_let_go(glock):
                later.append(glock)          # back at the young end: not before a flush
                continue
            batch.append(glock)
        for glock in later:
            self._lru[glock.name] = glock
        return batch

    async def _go_down(self, glock: Glock, target: Mode) -> None:
        """Run the kind's demote callback, then convert to `target` (NL: unlock)."""
        assert glock.lock is not None
        callback = self.demote_callbacks.get(str(glock.name[0]))
        if callback is not None:
            result: Any = callback(glock, target)
            if result is not None:
                await result
        glock.demotes += 1
        if target == Mode.NL:
            lock, glock.lock = glock.lock, None
            await self.locks.unlock(lock)
            self.stats["demoted"] += 1
        else:
            await self.locks.convert(glock.lock, target)
            self.stats["down_converted"] += 1

    async def run_idle_sharing(self, quiet: Callable[[], bool],
                               after: float = IDLE_SHARE) -> None:
        """Background task (cluster mounts): an EX glock of a kind in share_when_idle
        that no local user has taken for `after` seconds goes down to PR, as if another
        node had asked to read, while `quiet()` says there is nothing to write (so the
        demote costs no I/O). A node that made files and moved on keeps its clean
        copies, and another node reading them is granted PR by the master at once,
        without a blocking callback and a demote here first; taking EX again is a
        conversion, local when this node masters the lock (node/placement.py)."""
        while True:
            await trio.sleep(after / 2)
            if quiet():
                await self._share_idle(time.monotonic() - after, quiet)

    async def _share_idle(self, unused_since: float, quiet: Callable[[], bool]) -> None:
        """SHARE_BATCH glocks at a time, the event loop going on between (a node that
        had just made files held tens of thousands in EX: one step over all of them,
        starting a demote for each, stopped the loop for about 0.35 s under load,
        seen by the stall watch during stress-ng's dirmany); a node busy again
        (something to write) stops the round."""
        names = list(self._exclusive)
        for i, name in enumerate(names):
            if i and not i % SHARE_BATCH:
                await trio.sleep(0)
                if not quiet():
                    return
            glock = self._exclusive.get(name)
            if glock is None:
                continue
            if glock.mode != Mode.EX:
                del self._exclusive[name]
            elif glock.holders == 0 and glock.demote_to is None and \
                    glock.requesting is None and glock.released_at <= unused_since:
                del self._exclusive[name]
                self.stats["shared_when_idle"] += 1
                self._blocking(glock, Mode.PR)

    async def release_all(self) -> None:
        """At unmount: give every cached lock back. Each under its mutex: a demote
        still in flight (the shrinker's, another node's) finishes first rather than
        find its lock gone in the middle."""
        for glock in list(self.glocks.values()):
            async with glock.mutex:
                if glock.lock is not None:
                    lock, glock.lock = glock.lock, None
                    await self.locks.unlock(lock)
        self.glocks.clear()
        self._lru.clear()

    def statistics(self) -> dict[str, int]:
        held = sum(1 for g in self.glocks.values() if g.lock is not None)
        return {**self.stats, "cached": held}

    def dump(self) -> list[dict[str, Any]]:
        """Every glock this node caches, for `clusterfs status` / `locks`."""
        return [g.describe() for g in self.glocks.values()
                if g.lock is not None or g.requesting is not None]
