"""KernelForget: tell the kernel to forget inodes' attributes, many at a time.

A lock going down to nothing must not leave the kernel with attributes it may
serve after another node changed them, so the demote waits until the kernel was
told (`hook`, set by the FUSE layer). Telling it is a write to the FUSE
device from a worker thread (the event loop must stay free: an unmount holds the
kernel's side until we answer it). One thread round trip per inode made a burst of
demotes (the lock cache letting hundreds of idle inodes go, another node taking
a directory's worth of files) cost more than the demotes themselves; so demotes
that come while one round is out wait for the next, which takes them all.
"""

from __future__ import annotations

from collections.abc import Callable

import trio

from clusterfs import workers


class KernelForget:
    def __init__(self) -> None:
        self.hook: Callable[[int], None] | None = None
        self._queued: list[int] = []
        self._next_round = trio.Event()     # set once the round taking _queued is done
        self._running = False
        self.rounds = 0

    async def forget(self, ino: int) -> None:
        """Return once the kernel was told to forget `ino`'s attributes."""
        if self.hook is None:
            return
        self._queued.append(ino)
        done = self._next_round
        if self._running:
            await done.wait()
            return
        self._running = True
        try:
            while self._queued:
                inos, self._queued = self._queued, []
                done, self._next_round = self._next_round, trio.Event()
                try:
                    await workers.run(self._tell, inos)
                finally:
                    done.set()
        finally:
            self._running = False

    async def forget_many(self, inos: list[int]) -> None:
        """`forget` for several inodes, told in one round."""
        if inos:
            self._queued.extend(inos[:-1])       # (taken by the round that takes the last)
            await self.forget(inos[-1])

    def _tell(self, inos: list[int]) -> None:
        hook = self.hook
        assert hook is not None
        self.rounds += 1
        for ino in inos:
            hook(ino)
