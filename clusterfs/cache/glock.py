"""Glocks: this node's cached hold on one lock resource (the GFS2 glock life).

A glock takes the resource's lock from the LockService the first time the node
needs it and keeps it after use (no round trip for the next operation). When
another node asks for a conflicting mode, the LockService calls on_blocking; the
glock then waits until no local operation holds it, runs the resource's
`demote` callback (commit the journal, write back, drop cached state, tell the
kernel to forget what it caches), and releases the lock. The next local use
takes it again and re-reads from disk.

Operations acquire every glock they need up front, in a fixed order (sorted by
name), then run their body without awaiting: bodies are atomic with respect to
one another on this node, and ordering prevents deadlock between nodes.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from typing import Any

import trio

from clusterfs.dlm.interface import Lock, LockService, Mode, ResourceName

log = logging.getLogger(__name__)
DemoteCallback = Callable[[ResourceName], Awaitable[None] | None]


class Glock:
    def __init__(self, name: ResourceName) -> None:
        self.name = name
        self.lock: Lock | None = None
        self.holders = 0
        self.idle = trio.Event()
        self.idle.set()
        self.demote_requested = False

    @property
    def mode(self) -> Mode | None:
        return self.lock.mode if self.lock is not None else None


class GlockManager:
    def __init__(self, locks: LockService) -> None:
        self.locks = locks
        self.glocks: dict[ResourceName, Glock] = {}
        self.demote_callbacks: dict[str, DemoteCallback] = {}   # by resource kind
        self._nursery: trio.Nursery | None = None
        self.stats = {"acquired": 0, "cached_hits": 0, "demoted": 0}

    def start(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery

    def on_demote(self, kind: str, callback: DemoteCallback) -> None:
        self.demote_callbacks[kind] = callback

    async def acquire(self, wanted: Iterable[tuple[ResourceName, Mode]]) -> list[Glock]:
        """Hold every (name, mode), in sorted order; release with release(). A glock
        already cached in a sufficient mode is taken without awaiting (the fast path)."""
        merged: dict[ResourceName, Mode] = {}
        for name, mode in wanted:
            if merged.get(name, Mode.NL) < mode:
                merged[name] = mode
        taken: list[Glock] = []
        try:
            for name in sorted(merged):
                mode = merged[name]
                glock = self.glocks.get(name)
                if glock is not None and glock.lock is not None and \
                        not glock.demote_requested and glock.lock.mode >= mode:
                    if glock.holders == 0:
                        glock.idle = trio.Event()
                    glock.holders += 1
                    self.stats["cached_hits"] += 1
                else:
                    glock = await self._acquire(name, mode)
                taken.append(glock)
        except BaseException:
            self.release(taken)
            raise
        return taken

    def release(self, taken: list[Glock]) -> None:
        for glock in taken:
            self._release(glock)

    @asynccontextmanager
    async def hold(self, wanted: Iterable[tuple[ResourceName, Mode]]):
        """Hold every (name, mode) for the body (see acquire)."""
        taken = await self.acquire(wanted)
        try:
            yield
        finally:
            self.release(taken)

    async def _acquire(self, name: ResourceName, mode: Mode) -> Glock:
        glock = self.glocks.get(name)
        if glock is None:
            glock = self.glocks[name] = Glock(name)
        while glock.demote_requested:
            await glock.idle.wait()
            await trio.lowlevel.checkpoint()
        if glock.holders == 0:
            glock.idle = trio.Event()
        glock.holders += 1
        try:
            if glock.lock is None:
                glock.lock = await self.locks.lock(
                    name, mode, on_blocking=lambda m, g=glock: self._blocking(g, m))
                self.stats["acquired"] += 1
            elif glock.lock.mode < mode:
                await self.locks.convert(glock.lock, mode)
                self.stats["acquired"] += 1
        except BaseException:
            self._release(glock)
            raise
        return glock

    def _release(self, glock: Glock) -> None:
        glock.holders -= 1
        if glock.holders == 0:
            glock.idle.set()

    def _blocking(self, glock: Glock, mode: Mode) -> None:
        if glock.demote_requested or self._nursery is None:
            return
        glock.demote_requested = True
        self._nursery.start_soon(self._demote, glock)

    async def _demote(self, glock: Glock) -> None:
        """Flush what the lock covers, drop it from the cache, release the lock."""
        while glock.holders:
            await glock.idle.wait()
        try:
            callback = self.demote_callbacks.get(str(glock.name[0]))
            if callback is not None:
                result: Any = callback(glock.name)
                if result is not None:
                    await result
            if glock.lock is not None:
                lock, glock.lock = glock.lock, None
                await self.locks.unlock(lock)
            self.stats["demoted"] += 1
        finally:
            glock.demote_requested = False
            glock.idle.set()

    async def release_all(self) -> None:
        """At unmount: give every cached lock back."""
        for glock in list(self.glocks.values()):
            if glock.lock is not None:
                lock, glock.lock = glock.lock, None
                await self.locks.unlock(lock)
        self.glocks.clear()

    def statistics(self) -> dict[str, int]:
        held = sum(1 for g in self.glocks.values() if g.lock is not None)
        return {**self.stats, "cached": held}
