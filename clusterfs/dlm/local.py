"""LocalLockService: the lock interface for a filesystem mounted by one node.

Real queueing semantics inside one process (concurrent FUSE requests do
contend), no network. The distributed lock manager replaces it in a cluster.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import trio

from clusterfs.dlm.interface import (
    FULL_RANGE,
    LVB_SIZE,
    BlockingCallback,
    Lock,
    Mode,
    ResourceName,
    conflicts,
)
from clusterfs.errors import LockError, WouldBlock


@dataclass(eq=False)
class _Waiter:
    lock: Lock
    mode: Mode
    converting: bool
    granted: trio.Event = field(default_factory=trio.Event)


@dataclass
class _Resource:
    granted: list[Lock] = field(default_factory=list)
    queue: deque[_Waiter] = field(default_factory=deque)
    lvb: bytes = bytes(LVB_SIZE)


class LocalLockService:
    def __init__(self) -> None:
        self._resources: dict[ResourceName, _Resource] = {}
        self.stats = {"granted": 0, "waited": 0, "blocking_callbacks": 0}

    # -- public ------------------------------------------------------------
    async def lock(
        self,
        name: ResourceName,
        mode: Mode,
        *,
        range: tuple[int, int] = FULL_RANGE,
        try_: bool = False,
        on_blocking: BlockingCallback | None = None,
    ) -> Lock:
        lock = Lock(name=name, mode=Mode.NL, range=range, on_blocking=on_blocking)
        res = self._resources.setdefault(name, _Resource())
        await self._acquire(res, _Waiter(lock, Mode(mode), converting=False), try_)
        return lock

    async def convert(self, lock: Lock, mode: Mode, *, try_: bool = False) -> None:
        res = self._resource_of(lock)
        mode = Mode(mode)
        if mode <= lock.mode:
            self._store_lvb(res, lock, mode)
            lock.mode = mode
            self._grant_waiters(res)
            return
        await self._acquire(res, _Waiter(lock, mode, converting=True), try_)

    async def unlock(self, lock: Lock) -> None:
        res = self._resource_of(lock)
        self._store_lvb(res, lock, Mode.NL)
        res.granted.remove(lock)
        lock.granted = False
        self._grant_waiters(res)
        if not res.granted and not res.queue:
            del self._resources[lock.name]

    def statistics(self) -> dict[str, int]:
        return {**self.stats, "resources": len(self._resources)}

    # -- internals -----------------------------------------------------------
    def _resource_of(self, lock: Lock) -> _Resource:
        res = self._resources.get(lock.name)
        if res is None or lock not in res.granted:
            raise LockError(f"lock on {lock.name} is not held")
        return res

    @staticmethod
    def _store_lvb(res: _Resource, lock: Lock, new_mode: Mode) -> None:
        if lock.mode >= Mode.PW and new_mode < Mode.PW:
            res.lvb = bytes(lock.lvb[:LVB_SIZE]).ljust(LVB_SIZE, b"\0")

    def _grantable(self, res: _Resource, waiter: _Waiter, ahead: list[_Waiter]) -> bool:
        for other in res.granted:
            if other is waiter.lock:
                continue
            if conflicts(waiter.mode, waiter.lock.range, other.mode, other.range):
                return False
        if waiter.converting:
            return True
        # FIFO: a new request never overtakes an older conflicting waiter.
        return not any(
            conflicts(waiter.mode, waiter.lock.range, w.mode, w.lock.range) for w in ahead
        )

    def _grant(self, res: _Resource, waiter: _Waiter) -> None:
        lock = waiter.lock
        if not waiter.converting:
            res.granted.append(lock)
        lock.mode = waiter.mode
        lock.granted = True
        lock.lvb = res.lvb
        self.stats["granted"] += 1
        waiter.granted.set()

    def _grant_waiters(self, res: _Resource) -> None:
        ahead: list[_Waiter] = []
        for waiter in sorted(res.queue, key=lambda w: not w.converting):
            if self._grantable(res, waiter, ahead):
                res.queue.remove(waiter)
                self._grant(res, waiter)
            else:
                ahead.append(waiter)

    def _notify_blockers(self, res: _Resource, waiter: _Waiter) -> None:
        for other in list(res.granted):
            if other is waiter.lock or other.on_blocking is None:
                continue
            if conflicts(waiter.mode, waiter.lock.range, other.mode, other.range):
                self.stats["blocking_callbacks"] += 1
                other.on_blocking(waiter.mode)

    async def _acquire(self, res: _Resource, waiter: _Waiter, try_: bool) -> None:
        ahead = [w for w in res.queue if not waiter.converting or w.converting]
        if self._grantable(res, waiter, ahead):
            self._grant(res, waiter)
            return
        if try_:
            raise WouldBlock(f"{waiter.lock.name} busy")
        res.queue.append(waiter)
        self.stats["waited"] += 1
        self._notify_blockers(res, waiter)
        try:
            await waiter.granted.wait()
        except BaseException:
            if not waiter.granted.is_set():
                res.queue.remove(waiter)
                self._grant_waiters(res)
            elif not waiter.converting:
                # Granted in the same instant we were cancelled: give it back.
                self._store_lvb(res, waiter.lock, Mode.NL)
                res.granted.remove(waiter.lock)
                waiter.lock.granted = False
                self._grant_waiters(res)
            raise
