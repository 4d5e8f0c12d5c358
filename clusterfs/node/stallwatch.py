"""StallWatch: where a mount's event loop was when it stopped running.

A node whose event loop does not run for `probe_timeout` (1 s) while another node
waits on it was taken for dead and fenced (membership/detection.py; its beacons now
keep it in up to the failure timeout), and any stall holds up every request,
heartbeat and lock message behind it. stress-ng
on three nodes of a 2-core machine had a live node fenced that way (dirmany, after
stalls of 0.60 and 1.16 s its log had only the length of). What to fix is what the
loop was doing, and after the fact nothing says it. So a thread of ours watches the
loop move (a task notes the time every TICK) and, once the loop has not moved for
REPORT_AFTER, takes the loop thread's Python stack (sys._current_frames: function
names and line numbers, no source read, so the failover path opens no file) and logs
it at info, at most one stack every QUIET seconds; `clusterfs status` counts the
stalls and shows the longest.

A stall the watcher sees may not be the loop's own doing: the whole process waiting
for a CPU (a loaded machine) stops the watcher too, and then what it finds is where
the loop happened to be; a stack that recurs is the one to read.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import threading
import time
from types import FrameType
from typing import Any

import trio

from clusterfs import failover

log = logging.getLogger(__name__)

TICK = 0.05             # how often the loop notes that it runs, and the watcher looks
REPORT_AFTER = 0.3      # a loop stopped this long is a stall: its stack is logged
QUIET = 10.0            # at most one stack logged per this many seconds
MAX_FRAMES = 30         # innermost frames of a stack logged


class StallWatch:
    def __init__(self, report_after: float = REPORT_AFTER) -> None:
        self.report_after = report_after
        self._moved = time.monotonic()       # the loop's last tick (a float: atomic)
        self._loop_thread = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.stalls = 0                      # stalls of report_after or longer
        self.longest = 0.0
        self.last_stack = ""

    async def run(self) -> None:
        """The loop's side: note the time every TICK (and start the watcher)."""
        self._loop_thread = threading.get_ident()
        self._moved = time.monotonic()
        self._stop.clear()
        self._thread = failover.start_thread(self._watch, "stall-watch")
        try:
            while True:
                self._moved = time.monotonic()
                await trio.sleep(TICK)
        finally:
            self._stop.set()

    def _watch(self) -> None:
        said_at = -math.inf
        stalled_since: float | None = None
        while not self._stop.wait(TICK):
            now = time.monotonic()
            quiet = now - self._moved
            if quiet < self.report_after + TICK:   # (a tick is due every TICK)
                if stalled_since is not None:
                    self.longest = max(self.longest, now - stalled_since)
                    stalled_since = None
                continue
            if stalled_since is None:
                stalled_since = self._moved
                self.stalls += 1
                if now - said_at >= QUIET:
                    said_at = now
                    self.last_stack = self._stack()
                    log.info("the event loop has not run for %.2f s; it is in: %s",
                             quiet, self.last_stack)
            self.longest = max(self.longest, quiet)

    def _stack(self) -> str:
        frame = sys._current_frames().get(self._loop_thread)
        return format_stack(frame) if frame is not None else "(no frame)"

    def statistics(self) -> dict[str, Any]:
        return {"stalls": self.stalls, "longest": round(self.longest, 3),
                "last_stack": self.last_stack}


def format_stack(frame: FrameType | None) -> str:
    """Innermost first: `function (file:line)`, file relative to the package or
    library it is in; the code's own names only (no source line: nothing is read)."""
    out = []
    while frame is not None and len(out) < MAX_FRAMES:
        code = frame.f_code
        out.append(f"{code.co_name} ({_short(code.co_filename)}:{frame.f_lineno})")
        frame = frame.f_back
    return " < ".join(out)


def _short(path: str) -> str:
    """clusterfs/fs/filedata.py, trio/_core/_run.py, or the file's name."""
    parts = path.split(os.sep)
    if "clusterfs" in parts:
        return "/".join(parts[len(parts) - 1 - parts[::-1].index("clusterfs"):])
    if "site-packages" in parts:
        return "/".join(parts[len(parts) - parts[::-1].index("site-packages"):])
    return os.path.basename(path)
