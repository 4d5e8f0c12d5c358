"""FlushRing: device flushes (and reads) the event loop awaits with no worker thread
(io_uring).

An fsync(2) made in a worker thread costs the event loop a hand-off each way: 130-190
µs on this 2-core VM, more than the loop device's own write and flush (92 µs), and
paid by every fdatasync of an overwrite in place (the database pattern). Here the
kernel runs the flush, and the small queued write before it (linked: the flush
starts once the write is done, and is cancelled if it fails), and signals an
eventfd; a reaper task on the event loop wakes the waiter. Where the kernel refuses
io_uring (kernel.io_uring_disabled, a seccomp filter, an old kernel) `open` says so
once, at info, and callers go on flushing in a worker thread.

Reads go the same way (`read`): a block the filesystem does not have cached, read
while the event loop goes on serving (heartbeats, lock traffic, other requests)
instead of stopping it for as long as the disk takes; a read the kernel answers at
once (a block in the host's page cache) is taken right after its submission.

Opened at mount start with the device's other helpers, so a failover opens nothing
new (clusterfs.failover). Used from the event loop's thread only; the reaper is a
trio system task, started by the first request of each trio run. A request's
completion callback runs exactly once, from the reaper or, for requests still in
flight when the ring closes, from `close`, which waits for them (their buffers and
the write-behind's bookkeeping must outlive them).
"""

from __future__ import annotations

import errno
import itertools
import logging
import mmap
import os
import threading
from collections.abc import Callable

import trio

from clusterfs.native import Uring

log = logging.getLogger(__name__)

# CLUSTERFS_IO_URING=0 turns the ring off (flushes in a worker thread, as before it):
# for a kernel whose io_uring misbehaves, and to measure what the ring saves.
ENABLED = os.environ.get("CLUSTERFS_IO_URING", "1") != "0"
RING_ENTRIES = 32              # requests in flight at once; beyond, callers use a thread
WRITE_BUFFER = 64 * 1024       # the aligned buffer a linked write is staged in
READ_BUFFER = 1 << 20          # the largest read through the ring (FUSE's largest request)
READ_BUFFERS = 4               # reads in flight at once; beyond, callers read another way
_refusal_logged = False

Pieces = list[memoryview]
# ("write", fd, offset, pieces) or ("fsync", fd)
Step = tuple[str, int, int, Pieces] | tuple[str, int]


class _Request:
    """Requests submitted together; `finish` gets their results, in order, once all
    are in (bytes written, 0, or -errno)."""

    __slots__ = ("done", "finish", "left", "results")

    def __init__(self, count: int, finish: Callable[[list[int]], None]) -> None:
        self.results = [0] * count
        self.left = count
        self.finish = finish
        self.done = trio.Event()


class FlushRing:
    def __init__(self, ring: Uring, eventfd: int) -> None:
        self._ring = ring
        self._eventfd = eventfd
        self._ids = itertools.count(1)
        self._requests: dict[int, _Request] = {}
        self._in_flight = 0                          # submitted, not yet reaped
        self._buffer = mmap.mmap(-1, WRITE_BUFFER)   # page-aligned, for O_DIRECT
        self._staging = memoryview(self._buffer)
        self._buffer_busy = False
        # page-aligned (O_DIRECT), mapped now: under mlockall a mapping costs about
        # 1 ms per MiB, every page faulted in and locked
        self._read_buffers = [mmap.mmap(-1, READ_BUFFER) for _ in range(READ_BUFFERS)]
        self._reaper_token: trio.lowlevel.TrioToken | None = None
        self._loop_thread = 0                        # the reaper's event loop's thread
        self.broken: str | None = None
        self.read_inline = 0              # reads answered by their submission (no wait)

    @classmethod
    def open(cls) -> FlushRing | None:
        """A ring, or None (said once per process, at info) where io_uring is refused."""
        global _refusal_logged
        if not ENABLED:
            return None
        eventfd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        try:
            ring = Uring(RING_ENTRIES, eventfd)
        except OSError as exc:
            os.close(eventfd)
            if not _refusal_logged:
                _refusal_logged = True
                log.info("io_uring unavailable (%s): device flushes run in a worker "
                         "thread", exc.strerror)
            return None
        return cls(ring, eventfd)

    # -- what the device asks ---------------------------------------------------------
    async def fsync(self, fd: int) -> bool:
        """fsync(fd): True once done, False having done nothing (the ring is full,
        broken or not of this trio run: flush in a thread then). OSError if the
        flush failed."""
        return await self.chain([("fsync", fd)])

    def can_chain(self, length: int, requests: int) -> bool:
        """Whether chain() can take `requests` requests writing `length` bytes now."""
        return (length <= WRITE_BUFFER and not self._buffer_busy
                and self._usable(requests))

    async def chain(self, steps: list[Step],
                    done: Callable[[list[int]], None] | None = None) -> bool:
        """Run `steps` in order, each starting once the one before succeeded (a failure
        cancels the rest): ("write", fd, offset, pieces) writes the pieces (whole
        blocks; at most WRITE_BUFFER bytes in all: check can_chain first) back to
        back, ("fsync", fd) flushes. `done(results)` runs exactly once when they are
        all over (bytes written, 0, or -errno each), even if this task is cancelled
        meanwhile. True once all succeeded; False having done nothing (`done` is then
        never called); OSError naming the first that failed."""
        length = sum(len(p) for step in steps if step[0] == "write" for p in step[3])
        if not self.can_chain(length, len(steps)):
            return False
        entries: list[tuple[str, int, memoryview | None, int]] = []
        filled = 0
        for step in steps:
            if step[0] == "fsync":
                entries.append(("fsync", step[1], None, 0))
                continue
            _kind, fd, offset, pieces = step
            start = filled
            for piece in pieces:
                self._staging[filled : filled + len(piece)] = piece
                filled += len(piece)
            entries.append(("write", fd, self._staging[start:filled], offset))

        def finish(results: list[int]) -> None:
            self._buffer_busy = False
            if done is not None:
                done(results)

        self._buffer_busy = True
        request = self._submit(entries, finish)
        if request is None:
            self._buffer_busy = False
            return False
        await request.done.wait()
        failed = first_failure(request.results, steps)
        if failed is not None:
            raise failed
        return True

    async def read(self, fd: int, offset: int, length: int) -> bytes | None:
        """pread(fd, length, offset) with the event loop free meanwhile: the bytes
        (fewer at the device's end); None having done nothing (longer than READ_BUFFER,
        every read buffer in use, the ring full, broken or not of this trio run: read
        another way). OSError if the read failed. Cancelled, the read still completes
        into its buffer, which is free again only then."""
        if length > READ_BUFFER or not self._read_buffers or not self._usable(1):
            return None
        buf = self._read_buffers.pop()
        got: list[bytes] = []

        def finish(results: list[int]) -> None:
            if results[0] > 0:
                got.append(buf[: results[0]])      # (a copy) before the buffer is reused
            self._read_buffers.append(buf)

        with memoryview(buf) as view:
            request = self._submit([("read", fd, view[:length], offset)], finish)
        if request is None:
            self._read_buffers.append(buf)
            return None
        self._take_completions()         # answered at once: no wake-up to wait for
        if request.done.is_set():
            self.read_inline += 1
        await request.done.wait()        # (a checkpoint even then: loops of reads yield)
        result = request.results[0]
        if result < 0:
            raise OSError(-result, f"read at {offset}: {os.strerror(-result)}")
        return got[0] if got else b""

    # -- submission and completion --------------------------------------------------------
    def _usable(self, entries: int) -> bool:
        """Room for `entries` requests, and a reaper in this trio run (started here)."""
        if self.broken is not None or self._in_flight + entries > RING_ENTRIES:
            return False
        try:
            token = trio.lowlevel.current_trio_token()
        except RuntimeError:
            return False
        if token is not self._reaper_token:
            if self._in_flight:
                return False             # the reaper of an earlier run still owes answers
            trio.lowlevel.spawn_system_task(self._reap, name="flush ring reaper")
            self._reaper_token = token
            self._loop_thread = threading.get_ident()
        return True

    def _submit(self, entries: list[tuple[str, int, memoryview | None, int]],
                finish: Callable[[list[int]], None]) -> _Request | None:
        rid = next(self._ids)
        try:
            for i, (kind, fd, view, offset) in enumerate(entries):
                tag = rid << 8 | i
                link = i < len(entries) - 1      # each waits for the one before
                if kind == "fsync":
                    self._ring.queue_fsync(fd, link, tag)
                elif kind == "read":
                    self._ring.queue_read(fd, view, offset, tag)
                else:
                    self._ring.queue_write(fd, view, offset, link, tag)
            self._ring.submit()
        except OSError as exc:
            # what was queued is never submitted: the ring is not used again
            self.broken = f"submit: {exc.strerror}"
            log.warning("flush ring refused a request (%s): device flushes run in a "
                        "worker thread from now on", exc.strerror)
            return None
        request = self._requests[rid] = _Request(len(entries), finish)
        self._in_flight += len(entries)
        return request

    def _take_completions(self) -> None:
        for tag, result in self._ring.reap():
            self._in_flight -= 1
            rid, index = tag >> 8, tag & 0xFF
            request = self._requests.get(rid)
            if request is None:
                continue
            request.results[index] = result
            request.left -= 1
            if not request.left:
                del self._requests[rid]
                request.finish(request.results)
                request.done.set()

    async def _reap(self) -> None:
        try:
            while True:
                await trio.lowlevel.wait_readable(self._eventfd)
                try:
                    os.eventfd_read(self._eventfd)
                except BlockingIOError:
                    pass
                self._take_completions()
        except trio.ClosedResourceError:
            return                       # close(): it took what was in flight
        except Exception as exc:         # a system task must not crash the run
            self.broken = f"{type(exc).__name__}: {exc}"
            log.warning("flush ring stopped (%s): device flushes run in a worker thread",
                        self.broken)

    def settle_here(self) -> bool:
        """(For a synchronous wait on writes in flight here: a drain, a wait for room
        in the queue.) On the event loop's thread the reaper cannot run while the caller
        blocks it, so wait for every request in flight and finish them now: True.
        On any other thread False: the reaper finishes them."""
        if threading.get_ident() != self._loop_thread or not self._in_flight \
                or self._eventfd < 0:
            return False
        self._ring.wait(self._in_flight)
        self._take_completions()
        return True

    def close(self) -> None:
        """Wait for the requests in flight, run their callbacks, release the ring."""
        if self._eventfd < 0:
            return
        self.broken = "closed"
        try:
            if self._in_flight:
                self._ring.wait(self._in_flight)
                self._take_completions()
        finally:
            try:
                trio.lowlevel.notify_closing(self._eventfd)
            except RuntimeError:
                pass                     # not in a trio run: no reaper waits
            self._ring.close()
            os.close(self._eventfd)
            self._eventfd = -1


def first_failure(results: list[int], steps: list[Step]) -> OSError | None:
    """The first of `steps` whose result (bytes written, 0, or -errno) says it failed,
    as an OSError naming it; None if none did."""
    for step, result in zip(steps, results, strict=False):
        wanted = sum(len(p) for p in step[3]) if step[0] == "write" else 0
        if result != wanted:
            what = f"write at {step[2]}" if step[0] == "write" else "flush"
            if result < 0:
                return OSError(-result, f"{what}: {os.strerror(-result)}")
            return OSError(errno.EIO, f"{what}: short write ({result} of {wanted} bytes)")
    return None
