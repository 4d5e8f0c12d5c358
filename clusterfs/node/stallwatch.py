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
the loop happened to be; a stack that recurs is the one to read. So the report also
gives the loop thread's state as the kernel has it (runnable, or asleep where and in
which system call; read from /proc, so not during a failover path), and it and a
second line when the stall ends say how much CPU the loop's thread and the whole
process used meanwhile (thread CPU clocks: no file read): the loop's thread near the
stall's length, the loop itself was busy (the stack says where); the process far more
than the loop's thread, other threads ran and held the interpreter (a worker, or a
collection one of them started); both near nothing, the loop's thread was blocked (in
a system call, which the stack then names) or the process waited for a CPU.
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
        self._loop_tid = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.stalls = 0                      # stalls of report_after or longer
        self.longest = 0.0
        self.last_stack = ""
        self.last_cpu = ""                   # what the last reported stall's CPU went to

    async def run(self) -> None:
        """The loop's side: note the time every TICK (and start the watcher)."""
        self._loop_thread = threading.get_ident()
        self._loop_tid = threading.get_native_id()
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
        said = False                         # this stall's stack was logged
        mark = self._cpu()                   # CPU used up to the loop's last tick seen
        while not self._stop.wait(TICK):
            now = time.monotonic()
            quiet = now - self._moved
            if quiet < self.report_after + TICK:   # (a tick is due every TICK)
                if stalled_since is not None:
                    self.longest = max(self.longest, now - stalled_since)
                    if said:
                        self._say_cpu(now - stalled_since, mark)
                    stalled_since = None
                mark = self._cpu()
                continue
            if stalled_since is None:
                stalled_since = self._moved
                self.stalls += 1
                said = now - said_at >= QUIET
                if said:
                    said_at = now
                    self.last_stack = self._stack()
                    loop, process = self._cpu()
                    log.info("the event loop has not run for %.2f s (its thread used %.2f "
                             "s of CPU meanwhile, the whole process %.2f s; %s); it is in: "
                             "%s", quiet, loop - mark[0], process - mark[1],
                             self._kernel_state(), self.last_stack)
            self.longest = max(self.longest, quiet)

    def _cpu(self) -> tuple[float, float]:
        """CPU seconds used so far by the loop's thread (nan if its clock cannot be
        read) and by the whole process."""
        try:
            loop = time.clock_gettime(time.pthread_getcpuclockid(self._loop_thread))
        except (OSError, OverflowError, ValueError):
            loop = math.nan
        return loop, time.process_time()

    def _kernel_state(self) -> str:
        """The loop thread's state as the kernel sees it: runnable (waiting for a CPU
        or running), or asleep where (wchan) and in which system call; that tells a
        loop waiting for the interpreter lock (a futex) from one blocked in the kernel.
        Not during a failover path (it reads /proc, and the path opens no file)."""
        if failover.under_way():
            return "state not read: a failover path is under way"
        task = f"/proc/self/task/{self._loop_tid}"
        try:
            with open(f"{task}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
            with open(f"{task}/wchan") as f:
                wchan = f.read().strip()
            with open(f"{task}/syscall") as f:
                call = f.read().split()[0]
        except (OSError, IndexError) as exc:
            return f"state not read: {exc}"
        return f"thread state {state}, wchan {wchan or '-'}, system call {call}"

    def _say_cpu(self, length: float, mark: tuple[float, float]) -> None:
        loop, process = self._cpu()
        self.last_cpu = (f"stall {length:.2f} s: loop thread {loop - mark[0]:.2f} s of "
                         f"CPU, whole process {process - mark[1]:.2f} s")
        log.info("the event loop ran again after %.2f s; meanwhile its thread used %.2f s "
                 "of CPU and the whole process %.2f s", length, loop - mark[0],
                 process - mark[1])

    def _stack(self) -> str:
        frame = sys._current_frames().get(self._loop_thread)
        return format_stack(frame) if frame is not None else "(no frame)"

    def statistics(self) -> dict[str, Any]:
        return {"stalls": self.stalls, "longest": round(self.longest, 3),
                "last_stack": self.last_stack, "last_cpu": self.last_cpu}


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
