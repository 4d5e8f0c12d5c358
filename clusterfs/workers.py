"""The process's worker threads: a set started before the node joins, for the
blocking calls every layer hands off the event loop (device reads, journal commits,
checkpoints and replays, fencing, the generation record).

trio starts a worker thread whenever none is idle and lets an idle one exit after
10 s, so a failover that needs more threads than happen to be idle starts new ones,
and under mlockall each new thread's stack is faulted in and locked on the spot:
memory the failover path must not ask the kernel for (seeds 002, 003). So a mount
starts a pool (`start`) of `size` threads that live as long as the process; `run`
hands a call to one of them. With every thread busy a new one is started, up to
`most` (trio's default limiter allows 40 calls at once, and we keep that bound);
beyond it a call waits for a thread. Threads are never stopped, so a pool grows
only to the most calls it ever ran at once, and `stats()` says how many it started
after `start`.

Without a pool (tests, tools, fsck) `run` is trio.to_thread.run_sync: the same
semantics. Not cancellable by default (a cancelled caller waits for the call, then
sees the cancellation); with `abandon=True` a cancelled caller returns at once and
the call finishes on its own. (trio 0.23 renamed `to_thread.run_sync`'s
`cancellable` to `abandon_on_cancel`, and later releases dropped the old name.)
"""

from __future__ import annotations

import inspect
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import outcome
import trio

from clusterfs import failover

T = TypeVar("T")

MOST = 40                 # as trio's default thread limiter
# An idle worker waits for a call with a timeout, and waits again. Measured
# (2026-12-07, clusterbench, 3-node cluster on loop devices): with idle workers
# blocked in an untimed wait, a node's sequential 1 MiB writes after a burst of
# creates ran at 265-751 MiB/s against 900-1342 with timed waits (and 944-1363
# with trio's threads, which wait 10 s at a time): every O_DIRECT pwrite of the
# write-behind took about 2.5 times as long. Why, we have not found; trio's own
# threads wait the same timed way.
IDLE_WAIT = 10.0

_ABANDON = ("abandon_on_cancel" if "abandon_on_cancel"
            in inspect.signature(trio.to_thread.run_sync).parameters else "cancellable")

_Job = tuple[Callable[..., Any], tuple[Any, ...], Callable[[outcome.Outcome], None]]


class WorkerPool:
    """Threads that take calls from one queue. The counters are approximate under
    races only in the safe direction: at worst a thread more is started."""

    def __init__(self, size: int, most: int, stack: int) -> None:
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = 0            # threads waiting on the queue
        self._queued = 0          # calls put and not yet taken
        self._stack = stack
        self.most = max(most, size)
        self.threads: list[threading.Thread] = []
        self.size = size
        for _ in range(size):
            self._start_thread()

    def submit(self, job: _Job) -> None:
        with self._lock:
            self._queued += 1
            grow = self._queued > self._idle and len(self.threads) < self.most
            if grow:
                self._start_thread()
        self._jobs.put(job)

    def _start_thread(self) -> None:
        name = f"clusterfs-worker-{len(self.threads) + 1}"
        self.threads.append(failover.start_thread(self._work, name, stack=self._stack))

    def _work(self) -> None:
        while True:
            with self._lock:
                self._idle += 1
            job = self._next_job()
            with self._lock:
                self._idle -= 1
                self._queued -= 1
            if job is None:
                return
            fn, args, deliver = job
            deliver(outcome.capture(fn, *args))
            del job, fn, args, deliver

    def _next_job(self) -> _Job | None:
        while True:
            try:
                return self._jobs.get(timeout=IDLE_WAIT)
            except queue.Empty:
                continue

    def stop(self) -> None:
        """Let every thread end once the calls queued before this have run."""
        for _ in self.threads:
            self._jobs.put(None)

    def stats(self) -> dict[str, int]:
        return {"threads": len(self.threads), "started_after_start": len(self.threads)
                - self.size, "busy": len(self.threads) - self._idle, "most": self.most}


_pool: WorkerPool | None = None


def start(size: int, stack: int, most: int = MOST) -> WorkerPool:
    """Start this process's pool (once; a second call returns the first pool)."""
    global _pool
    if _pool is None:
        _pool = WorkerPool(size, most, stack)
    return _pool


def stop() -> None:
    """Back to trio's threads (tests); the pool's threads end after their calls."""
    global _pool
    pool, _pool = _pool, None
    if pool is not None:
        pool.stop()


def stats() -> dict[str, int] | None:
    return _pool.stats() if _pool is not None else None


async def run(fn: Callable[..., T], *args: Any, abandon: bool = False) -> T:
    """fn(*args) in a worker thread (module doc for cancellation)."""
    pool = _pool
    if pool is None:
        return await trio.to_thread.run_sync(fn, *args, **{_ABANDON: abandon})
    task = trio.lowlevel.current_task()
    token = trio.lowlevel.current_trio_token()
    abandoned = False          # read and written in the event loop's thread only

    def back(result: outcome.Outcome) -> None:
        if not abandoned:
            trio.lowlevel.reschedule(task, result)

    def deliver(result: outcome.Outcome) -> None:     # in the worker thread
        try:
            token.run_sync_soon(back, result)
        except trio.RunFinishedError:
            pass                 # an abandoned call outlived its event loop

    def abort(_raise_cancel: Any) -> trio.lowlevel.Abort:
        nonlocal abandoned
        if abandon:
            abandoned = True
            return trio.lowlevel.Abort.SUCCEEDED
        return trio.lowlevel.Abort.FAILED

    pool.submit((fn, args, deliver))
    return await trio.lowlevel.wait_task_rescheduled(abort)   # the outcome, unwrapped
