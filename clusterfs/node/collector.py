"""The garbage collector's pauses, kept short and watched.

A full collection walks every object the mount made since start-up with the event
loop stopped, so its pause grows with the caches: 241-248 ms on a node holding 50 000
cached locks and inodes (two runs, load 5), and a lock cache raised with -o max_glocks
would stretch it towards the failure timeout. Yet it finds almost nothing to free:
0 and 9 objects in those runs, since the mount's short-lived cycles (trio tasks,
exceptions) die in young collections. So what survives a full collection is frozen
(gc.freeze: moved out of the collector's sight; reference counting still frees it),
and the next full collection walks only what was made since. The price: a cycle that
forms among frozen objects later is never reclaimed (a few objects per collection at
the rates above).

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


class CollectorWatch:
    def __init__(self) -> None:
        self.full = 0
        self.freed = 0              # objects full collections found unreachable, in all
        self.longest = 0.0
        self.last = 0.0
        self.recent: deque[float] = deque(maxlen=8)
        self._started = 0.0
        self._logged_at = -LOG_EVERY

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
            return
        pause = now - self._started
        gc.freeze()                 # (the collection is over: only list moves)
        self.full += 1
        self.freed += info.get("collected", 0)
        self.last = pause
        self.recent.append(pause)
        self.longest = max(self.longest, pause)
        if pause >= PAUSE_LOGGED and now - self._logged_at >= LOG_EVERY:
            self._logged_at = now
            log.info("a full garbage collection stopped the event loop %.0f ms (%d "
                     "objects freed)", pause * 1000, info.get("collected", 0))

    def statistics(self) -> dict[str, float]:
        return {"full_collections": self.full, "freed": self.freed,
                "longest_ms": round(self.longest * 1000, 1),
                "last_ms": round(self.last * 1000, 1),
                "recent_ms": [round(p * 1000, 1) for p in self.recent]}
