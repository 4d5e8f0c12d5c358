"""The garbage collector's pauses, kept short and watched.

A full collection walks every object the mount made since start-up with the event
loop stopped, so its pause grows with the caches: 241-248 ms on a node holding 50 000
cached locks and inodes (two runs, load 5), and a lock cache raised with -o max_glocks
would stretch it towards the failure timeout. What it walks is mostly the cache, alive
(it freed 0 and 9 objects in those runs; under stress-ng up to 16 825, cycles made
since the collection before). So what survives a full collection is frozen
(gc.freeze: moved out of the collector's sight; reference counting still frees it),
and the next full collection walks only what was made since. The price: a cycle that
forms among frozen objects later is not reclaimed until the next full walk, which
comes every UNFREEZE_EVERY (everything unfrozen as a full collection starts: one long
pause per period instead of one at every growth of the cache).

Each full collection is timed; one past PAUSE_LOGGED is logged (at most one line a
minute), and `clusterfs status` shows the count, what they freed, the longest pause
and the last."""

from __future__ import annotations

import gc
import logging
import time
from collections import deque
from typing import Any

log = logging.getLogger(__name__)

PAUSE_LOGGED = 0.1         # seconds: a full collection this long is said in the log
LOG_EVERY = 60.0           # seconds between two such lines at most
# A full collection walks everything frozen again at most this often: a cycle formed
# among frozen objects is reclaimed then, so what a long-lived mount can leak is bounded
# by what becomes garbage in one period (a stress-ng run's full collections freed up to
# 16 825 objects at once: cycles do reach the old generation under some workloads).
UNFREEZE_EVERY = 600.0


class CollectorWatch:
    def __init__(self) -> None:
        self.full = 0
        self.freed = 0              # objects full collections found unreachable, in all
        self.longest = 0.0
        self.recent: deque[float] = deque(maxlen=8)
        self._started = 0.0
        self._logged_at = -LOG_EVERY
        self._unfrozen_at = time.monotonic()
        self.unfreezes = 0

    def install(self) -> None:
        if self._callback not in gc.callbacks:
            gc.callbacks.append(self._callback)

    def uninstall(self) -> None:
        if self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if info.get("generation") != 2:
            return
        now = time.monotonic()
        if phase == "start":
            self._started = now
            if now - self._unfrozen_at >= UNFREEZE_EVERY:
                self._unfrozen_at = now
                self.unfreezes += 1
                gc.unfreeze()       # (not begun yet: this one walks everything)
            return
        pause = now - self._started
        gc.freeze()                 # (the collection is over: only list moves)
        self.full += 1
        self.freed += info.get("collected", 0)
        self.recent.append(pause)
        self.longest = max(self.longest, pause)
        if pause >= PAUSE_LOGGED and now - self._logged_at >= LOG_EVERY:
            self._logged_at = now
            log.info("a full garbage collection stopped the event loop %.0f ms (%d "
                     "objects freed)", pause * 1000, info.get("collected", 0))

    @property
    def last(self) -> float:
        """The last full collection's pause (0 before the first)."""
        return self.recent[-1] if self.recent else 0.0

    def statistics(self) -> dict[str, Any]:
        return {"full_collections": self.full, "freed": self.freed,
                # objects found in cycles by each generation's collections since start:
                # what reference counting could not free (its sources are bugs to fix)
                "in_cycles_by_generation": [g["collected"] for g in gc.get_stats()],
                "full_walks": self.unfreezes,
                "longest_ms": round(self.longest * 1000, 1),
                "last_ms": round(self.last * 1000, 1),
                "recent_ms": [round(p * 1000, 1) for p in self.recent]}
