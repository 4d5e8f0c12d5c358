"""LocalLockService: the lock interface for a filesystem mounted by one node.

Real queueing semantics inside one process (concurrent FUSE requests do
contend), no network. The distributed lock manager replaces it in a cluster.

The rules (compatibility, ranges, FIFO, conversions, deadlock, blocking
callbacks, LVBs) are the C lock table's (native/locktable.c), the same one
every DLM master runs, so the single node and the cluster cannot drift apart.
This module only maps table events to trio: a grant wakes the waiting task, a
blocking event calls the holder's `on_blocking`.
"""

from __future__ import annotations

import contextlib
import logging

import trio

from clusterfs.dlm.interface import (
    FULL_RANGE,
    LVB_SIZE,
    BlockingCallback,
    Lock,
    Mode,
    ResourceName,
    resource_key,
)
from clusterfs.dlm.locktable import EventType, LockTable, TableEvent
from clusterfs.errors import LockError, WouldBlock

log = logging.getLogger(__name__)

NODE_ID = 0   # every lock here is this process's; the table only stores it
# Idle resources (no locks) keep their LVB until they have stayed idle through
# one whole sweep period, counted in unlocks (no timer: we own no task).
SWEEP_EVERY_UNLOCKS = 1024


class LocalLockService:
    def __init__(self) -> None:
        self._table = LockTable()
        self._locks: dict[int, Lock] = {}            # every live lock, granted or queued
        self._waiting: dict[int, trio.Event] = {}    # queued lkid -> set at its grant
        self._next_lkid = 0
        self._unlocks = 0
        self._epoch = 0
        self.stats = {"granted": 0, "waited": 0, "blocking_callbacks": 0}

    # -- public ------------------------------------------------------------
    def batched(self) -> contextlib.nullcontext[None]:
        """Nothing to gather: every request is answered here, with no message."""
        return contextlib.nullcontext()

    async def lock(
        self,
        name: ResourceName,
        mode: Mode,
        *,
        range: tuple[int, int] = FULL_RANGE,
        try_: bool = False,
        on_blocking: BlockingCallback | None = None,
    ) -> Lock:
        if type(mode) is not Mode:   # (Mode(Mode.EX) costs as much as the C call)
            mode = Mode(mode)
        lock = Lock(name=name, mode=Mode.NL, range=range, on_blocking=on_blocking)
        lkid = self._next_lkid = self._next_lkid + 1
        lock.extra["lkid"] = lkid
        try:
            granted = self._table.request(resource_key(name), lkid, NODE_ID, mode, range,
                                          try_=try_)
        except WouldBlock:
            raise WouldBlock(f"{name} busy") from None
        except OverflowError:
            raise LockError(f"bad range {range}") from None
        self._locks[lkid] = lock
        if granted:
            self._set_granted(lock, lkid, mode)
            return lock   # a request granted at once causes no table events
        await self._wait_queued(lock, lkid, mode, converting=False)
        return lock

    async def convert(self, lock: Lock, mode: Mode, *, try_: bool = False) -> None:
        lkid = self._held_lkid(lock)
        if type(mode) is not Mode:
            mode = Mode(mode)
        try:
            granted = self._table.convert(lkid, mode, try_=try_, lvb=self._lvb_to_store(lock))
        except WouldBlock:
            raise WouldBlock(f"{lock.name} busy") from None
        if granted:
            if mode > lock.mode:
                self._set_granted(lock, lkid, mode)   # up: the value comes with it
            else:
                lock.mode = mode                     # down: we keep our copy
            self._deliver(self._table.events())
            return
        await self._wait_queued(lock, lkid, mode, converting=True)

    async def unlock(self, lock: Lock) -> None:
        lkid = self._held_lkid(lock)
        self._table.unlock(lkid, self._lvb_to_store(lock))
        del self._locks[lkid]
        lock.granted = False
        self._deliver(self._table.events())
        self._unlocks += 1
        if self._unlocks % SWEEP_EVERY_UNLOCKS == 0:
            self._sweep_idle()

    def statistics(self) -> dict[str, int]:
        t = self._table.statistics()
        return {**self.stats, "resources": t.resources - t.idle}

    # -- internals -----------------------------------------------------------
    def _held_lkid(self, lock: Lock) -> int:
        lkid = lock.extra.get("lkid")
        if lkid is None or self._locks.get(lkid) is not lock or not lock.granted \
                or lkid in self._waiting:
            raise LockError(f"lock on {lock.name} is not held")
        return lkid

    @staticmethod
    def _lvb_to_store(lock: Lock) -> bytes | None:
        """A PW/EX holder's value, stored by the table when it goes below PW."""
        if lock.mode < Mode.PW:
            return None
        return bytes(lock.lvb[:LVB_SIZE]).ljust(LVB_SIZE, b"\0")

    def _set_granted(self, lock: Lock, lkid: int, mode: Mode) -> None:
        lock.mode = mode
        lock.granted = True
        lock.lvb, _seq, lock.lvb_valid = self._table.lock_lvb(lkid)
        self.stats["granted"] += 1

    async def _wait_queued(self, lock: Lock, lkid: int, mode: Mode, *,
                           converting: bool) -> None:
        granted = self._waiting[lkid] = trio.Event()
        self.stats["waited"] += 1
        self._deliver(self._table.events())   # the holders in our way hear of us
        try:
            await granted.wait()
        except BaseException:
            self._give_up(lock, lkid, converting)
            raise

    def _give_up(self, lock: Lock, lkid: int, converting: bool) -> None:
        """The waiting task was cancelled: withdraw the request or conversion."""
        self._waiting.pop(lkid, None)
        if self._table.cancel(lkid):
            if not converting:
                del self._locks[lkid]
        elif not converting:
            # Granted in the same instant we were cancelled: give it back.
            self._table.unlock(lkid)
            del self._locks[lkid]
            lock.granted = False
        # (a conversion granted in that instant stays granted, as it always was)
        self._deliver(self._table.events())

    def _deliver(self, events: list[TableEvent]) -> None:
        """Grants wake their waiting task; blocking events call on_blocking."""
        for ev in events:
            lock = self._locks.get(ev.lkid)
            if lock is None:
                continue
            if ev.type == EventType.GRANT:
                self._set_granted(lock, ev.lkid, ev.mode)
                waiter = self._waiting.pop(ev.lkid, None)
                if waiter is not None:
                    waiter.set()
            elif lock.on_blocking is not None:
                self.stats["blocking_callbacks"] += 1
                try:
                    lock.on_blocking(ev.mode)
                except Exception:
                    # one holder's bug must not stop the others' grants
                    log.exception("blocking callback for %s failed", lock.name)

    def _sweep_idle(self) -> None:
        """Free resources idle (no locks, LVB unused) for a whole sweep period."""
        self._epoch += 1
        self._table.set_epoch(self._epoch)
        self._table.drop_idle(self._epoch - 1)
