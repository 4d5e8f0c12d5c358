"""BlockDevice: a loop device, block device or plain image file, read and written in blocks.

Buffered I/O plus fsync (os.fsync on the device fd is the cache flush) for one node,
where it is both correct and faster. A cluster mount calls bypass_page_cache(): every
read and write then goes through O_DIRECT with aligned buffers, since the page cache
of one host does not see another host's writes (docs/journal.md). File data goes
around the page cache in both modes (the write-behind and read-ahead below).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import itertools
import mmap
import os
import queue
import stat
import threading
from collections import deque
from collections.abc import Callable, Iterable

import trio

from clusterfs import failover, workers
from clusterfs.errors import StorageError
from clusterfs.format.block import BLOCK_SIZE
from clusterfs.storage.ring import WRITE_BUFFER, FlushRing, Step, first_failure

SYNC_FILE_RANGE_WRITE = 2
WRITEBACK_TRIGGER = 256 * 1024      # a queued write this large starts its writeback at once
WRITE_BEHIND_LIMIT = 32 << 20       # bytes of data writes that may wait in the queue
DIRECT_STAGING = 4 << 20            # the aligned buffer O_DIRECT data writes go through
# Queued data writes that continue one another are held back until this many bytes
# are waiting (or someone needs them on the device: a drain, a flush, any other I/O)
# and then written as one: a loop device over tmpfs took 1 MiB O_DIRECT writes at
# 1482-1974 MiB/s and 4 MiB ones at 3161-3366, with one thread wake-up per batch.
WRITE_BATCH = DIRECT_STAGING
# Direct read-ahead: up to AHEAD_CHUNKS reads of AHEAD_CHUNK bytes in flight or ready,
# made by AHEAD_THREADS threads (a virtio disk behind a loop device streamed 300-600 MiB/s
# with two reads in flight, about 1250 with four).
# 12 x 4 MiB covers the file system's 32 MiB window plus the 8 MiB step it tops up by.
AHEAD_CHUNK = 4 << 20
AHEAD_CHUNKS = 12
AHEAD_THREADS = 4
# how long a request waits on the event loop for a read-ahead chunk still being read
# before it waits with the loop free (DirectReadAhead.wait_ready)
AHEAD_WAIT_ON_LOOP = 0.002
# False: sequential reads go through the page cache with posix_fadvise read-ahead, as
# before the direct read-ahead (faster over the VM's disk in our runs, see
# docs/benchmarks.md; slower and costlier in CPU over tmpfs).
DIRECT_READ_AHEAD = True


def _load_sync_file_range():
    """libc's sync_file_range(2) (os has no binding), or None where it is missing."""
    try:
        fn = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    fn.restype = ctypes.c_int
    return fn


_sync_file_range = _load_sync_file_range()


class _Advisor:
    """A daemon thread making posix_fadvise(WILLNEED) calls off the caller's thread."""

    def __init__(self) -> None:
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = failover.start_thread(self._run, "fadvise")

    def _run(self) -> None:
        while (item := self.queue.get()) is not None:
            fd, offset, length = item
            try:
                os.posix_fadvise(fd, offset, length, os.POSIX_FADV_WILLNEED)
            except OSError:
                pass                 # fd closed meanwhile, or not supported: a hint

    def stop(self) -> None:
        """Finish the advice queued so far (the fd must stay open until then)."""
        self.queue.put(None)
        self.thread.join()


def _open_direct(path: str, access: int) -> int | None:
    """An O_DIRECT descriptor on `path`, or None where the file or platform refuses it
    (os.O_DIRECT is missing off Linux, a tmpfs file refuses it with EINVAL)."""
    try:
        return os.open(path, access | os.O_DIRECT | os.O_CLOEXEC)
    except (OSError, AttributeError):
        return None


class _DirectWriter:
    """Whole-block writes through an O_DIRECT descriptor, staged in an aligned buffer.

    A buffered write of file data costs a copy into the device's page cache, dirty
    accounting, and later a writeback pass; with O_DIRECT the device takes the data
    straight from our buffer (one plain memcpy into it first, since the bytes FUSE
    hands us are not aligned). Measured on a loop device: about a quarter of the
    system CPU per MiB. The kernel keeps the buffered descriptor coherent (a direct
    write first writes back and afterwards drops cached pages of its range), and
    flush() on the buffered descriptor still makes these writes durable. A shared
    disk will need O_DIRECT for every access anyway (docs/journal.md)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.staging = mmap.mmap(-1, DIRECT_STAGING)     # page-aligned

    @classmethod
    def open(cls, path: str) -> _DirectWriter | None:
        """None where the device or file refuses O_DIRECT (then writes stay buffered)."""
        fd = _open_direct(path, os.O_WRONLY)
        return None if fd is None else cls(fd)

    def write(self, offset: int, pieces: list[memoryview]) -> None:
        """Write the pieces back to back from `offset`, gathered into the staging
        buffer: one pwrite per DIRECT_STAGING bytes, however the pieces are cut."""
        filled = 0
        with memoryview(self.staging) as staging:
            for data in pieces:
                done = 0
                while done < len(data):
                    n = min(len(data) - done, DIRECT_STAGING - filled)
                    staging[filled : filled + n] = data[done : done + n]
                    filled += n
                    done += n
                    if filled == DIRECT_STAGING:
                        self._put(staging, filled, offset)
                        offset += filled
                        filled = 0
            if filled:
                self._put(staging, filled, offset)

    def _put(self, staging: memoryview, length: int, offset: int) -> None:
        done = 0
        while done < length:
            written = os.pwrite(self.fd, staging[done:length], offset + done)
            if written % BLOCK_SIZE or written == 0:
                raise OSError(errno.EIO, "short direct write")
            done += written

    def close(self) -> None:
        os.close(self.fd)
        self.staging.close()


class _DirectIO:
    """Metadata reads and writes through an O_DIRECT descriptor and an aligned bounce
    buffer: on a disk several hosts share, our page cache would keep serving blocks
    another host has rewritten since (a cluster mount turns this on; one node keeps the
    page cache, which is faster and then correct). Unaligned writes (a partial block
    zeroed by truncate) read, modify and write the blocks around them. Thread-safe:
    the journal flushes in worker threads, recovery replays in the event loop."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.lock = threading.Lock()
        self.buf = mmap.mmap(-1, DIRECT_STAGING)        # page-aligned

    def pread(self, offset: int, length: int) -> bytes:
        out = bytearray()
        with self.lock, memoryview(self.buf) as view:
            while len(out) < length:
                n = min(length - len(out), DIRECT_STAGING)
                got = os.preadv(self.fd, [view[:n]], offset + len(out))
                out += view[:got]
                if got < n:
                    break                                  # end of device
        return bytes(out)

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        start = offset - offset % BLOCK_SIZE
        end = -(-(offset + len(data)) // BLOCK_SIZE) * BLOCK_SIZE
        if start != offset or end != offset + len(data):
            whole = bytearray(self.pread(start, end - start))
            whole[offset - start : offset - start + len(data)] = data
            offset, data = start, whole
        with self.lock, memoryview(self.buf) as view, memoryview(data) as src:
            done = 0
            while done < len(src):
                n = min(len(src) - done, DIRECT_STAGING)
                view[:n] = src[done : done + n]
                written = os.pwrite(self.fd, view[:n], offset + done)
                if written != n:
                    raise OSError(errno.EIO, "short direct write")
                done += n

    def close(self) -> None:
        """Under the lock: a read or write still under way in another thread (one a
        cancelled caller abandoned, as the disk heartbeat's) holds a view of the buffer,
        and closing the buffer under it raises BufferError; wait for it instead."""
        with self.lock:
            os.close(self.fd)
            # a view may still be referenced by a failed call's traceback (its
            # slice): the buffer then goes with the last view
            with contextlib.suppress(BufferError):
                self.buf.close()


class _Chunk:
    """One direct read-ahead: device bytes [offset, offset+length) read into `buf`."""

    __slots__ = ("offset", "length", "buf", "ready", "failed", "stale", "lent", "consumed",
                 "waiters")

    def __init__(self, offset: int, length: int, buf: mmap.mmap) -> None:
        self.offset, self.length, self.buf = offset, length, buf
        self.ready = self.failed = self.stale = False
        self.lent = False        # a view of it handed out since the last take/submit
        self.consumed = False    # read to its end: the first to go for a new chunk
        # trio tasks awaiting the read (wait_ready), woken by the helper thread
        self.waiters: list[tuple[trio.lowlevel.TrioToken, trio.Event]] = []

    def covers(self, offset: int, length: int) -> bool:
        return self.offset <= offset and offset + length <= self.offset + self.length

    def overlaps(self, offset: int, length: int) -> bool:
        return offset < self.offset + self.length and self.offset < offset + length


def _wake(waiters: list[tuple[trio.lowlevel.TrioToken, trio.Event]]) -> None:
    """(Any thread.) Set each trio task's event in its own run."""
    for token, done in waiters:
        with contextlib.suppress(trio.RunFinishedError):
            token.run_sync_soon(done.set)


class _DirectReadAhead:
    """Read-ahead for sequential readers with O_DIRECT reads into our own aligned
    buffers, served from them without a copy.

    Through the page cache (posix_fadvise) every MiB was inserted into the device's
    cache and then copied out by pread into a new bytes object; here the device
    fills our buffer and FUSE replies straight from it: on a loop device about a
    sixth of the reader's CPU per MiB. Helper threads make the reads, so the device
    streams while requests are answered. Every write through BlockDevice marks
    overlapping chunks stale first, and the kernel writes back dirty cached pages of
    a range before reading it directly, so a chunk never serves older data than the
    device holds. take and submit are called from the event-loop thread, invalidate
    also from worker threads (a journal commit or checkpoint writes metadata there):
    the chunk list is changed under `mutex`, whose holder may wait for a read.
    A view returned by take() stays valid until the next take() or submit(): the
    file system submits a request's read-ahead before taking its data, and pyfuse3
    sends the reply before another request runs. So a buffer goes back to the free
    list only from those calls, on the event loop; a chunk dropped elsewhere (a
    worker thread's write) with a view out hands its buffer over at the next one."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.free: list[mmap.mmap] = []           # made as needed, up to AHEAD_CHUNKS
        self.allocated = 0
        self.chunks: list[_Chunk] = []            # oldest first
        self.mutex = threading.RLock()            # over chunks (see the class doc)
        self.lent: list[mmap.mmap] = []           # dropped with a view out (under cond)
        self.cond = threading.Condition()
        self.queue: deque[_Chunk] = deque()
        self.stopping = False
        self.broken = False                       # O_DIRECT refused: callers fall back
        self.threads = [failover.start_thread(self._run, "read-ahead")
                        for _ in range(AHEAD_THREADS)]
        self.threads.append(failover.start_thread(self._make_buffers, "read-ahead-buffers"))

    def _make_buffers(self) -> None:
        """Map every buffer now, in the background: a 4 MiB mapping costs 3-4 ms under
        mlockall (every page faulted in and locked), and eight made on the event loop
        for a cold reader's first window held its third read up by 30 ms."""
        while True:
            with self.cond:
                if self.stopping or self.allocated >= AHEAD_CHUNKS:
                    return
                self.allocated += 1
            try:
                buf = mmap.mmap(-1, AHEAD_CHUNK)         # page-aligned, for O_DIRECT
            except OSError:
                with self.cond:
                    self.allocated -= 1
                return
            with self.cond:
                self.free.append(buf)

    @classmethod
    def open(cls, path: str) -> _DirectReadAhead | None:
        """None where the device or file refuses O_DIRECT (then reads stay buffered)."""
        fd = _open_direct(path, os.O_RDONLY)
        return None if fd is None else cls(fd)

    # -- event-loop side ----------------------------------------------------------------
    def submit(self, offset: int, length: int,
               skip: Callable[[int, int], bool] | None = None) -> None:
        """Read [offset, offset+length) ahead, in chunks, as far as buffers allow; not
        the chunks `skip(offset, length)` says to leave out."""
        with self.mutex:
            self._submit(offset, length, skip)

    def _submit(self, offset: int, length: int,
                skip: Callable[[int, int], bool] | None) -> None:
        self._release_lent()
        end = offset + length
        while offset < end and not self.broken:
            n = min(AHEAD_CHUNK, end - offset)
            if not any(c.covers(offset, n) for c in self.chunks) and \
                    not (skip is not None and skip(offset, n)):
                buf = self._buffer()
                if buf is None:
                    return                        # window full: the reader catches up
                chunk = _Chunk(offset, n, buf)
                self.chunks.append(chunk)
                with self.cond:
                    self.queue.append(chunk)
                    self.cond.notify()
            offset += n

    def covering(self, offset: int, length: int) -> _Chunk | None:
        """The chunk that will answer a take() of the range now, if any."""
        with self.mutex:
            for chunk in self.chunks:
                if chunk.covers(offset, length) and not chunk.stale:
                    return chunk
        return None

    async def wait_ready(self, chunk: _Chunk) -> None:
        """(Event loop.) Until the chunk's read is over: a moment on the loop (a read
        under way usually ends within it, and a trio wake-up from the helper thread
        costs more), then with the loop free (a busy disk may take much longer)."""
        with self.cond:
            if not chunk.ready:
                self.cond.wait_for(lambda: chunk.ready, AHEAD_WAIT_ON_LOOP)
            if chunk.ready:
                return
            done = trio.Event()
            chunk.waiters.append((trio.lowlevel.current_trio_token(), done))
        await done.wait()

    def take(self, offset: int, length: int) -> memoryview | None:
        """The bytes of a chunk covering the range (waiting for its read), or None."""
        with self.mutex:
            return self._take(offset, length)

    def _take(self, offset: int, length: int) -> memoryview | None:
        self._release_lent()
        for chunk in self.chunks:
            if chunk.covers(offset, length) and not chunk.stale:
                with self.cond:
                    while not chunk.ready:
                        self.cond.wait()
                if chunk.failed:
                    self._drop(chunk)
                    return None
                rel = offset - chunk.offset
                # (read to its end, it stays: a reader's requests need not end on
                # block boundaries, and the next may want the rest of the last block)
                chunk.consumed = chunk.consumed or rel + length == chunk.length
                chunk.lent = True
                return memoryview(chunk.buf)[rel : rel + length]
        return None

    def _release_lent(self) -> None:
        """(Event loop, between requests.) Every view handed out has been replied."""
        with self.cond:
            self.free += self.lent
            self.lent.clear()
        for chunk in self.chunks:
            chunk.lent = False

    def invalidate(self, offset: int, length: int) -> None:
        with self.mutex:
            for chunk in [c for c in self.chunks if c.overlaps(offset, length)]:
                self._drop(chunk)

    def _buffer(self) -> mmap.mmap | None:
        """A free buffer, recycling the oldest finished chunk if none is free (or None:
        the window is full, or _make_buffers has not mapped any yet)."""
        if not self.free:
            done = [c for c in self.chunks if c.ready and c.consumed] or \
                [c for c in self.chunks if c.ready]
            if done:
                self._drop(done[0])
        with self.cond:
            return self.free.pop() if self.free else None

    def _drop(self, chunk: _Chunk) -> None:
        """Forget a chunk; its buffer is free at once if read (at the next take or
        submit if a view of it is out), else when its read ends."""
        self.chunks.remove(chunk)
        with self.cond:
            chunk.stale = True
            if chunk.ready:
                (self.lent if chunk.lent else self.free).append(chunk.buf)

    # -- helper threads -------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self.cond:
                while not self.queue and not self.stopping:
                    self.cond.wait()
                if self.stopping:
                    return
                chunk = self.queue.popleft()
                if chunk.stale:                   # dropped before its read started
                    chunk.ready = True
                    self.free.append(chunk.buf)
                    waiters, chunk.waiters = chunk.waiters, []
            if not chunk.ready:
                got = self._read(chunk)
                with self.cond:
                    if got is None or got < chunk.length:
                        chunk.failed = True       # the caller reads it the plain way
                    chunk.ready = True
                    if chunk.stale:
                        self.free.append(chunk.buf)
                    self.cond.notify_all()
                    waiters, chunk.waiters = chunk.waiters, []
            _wake(waiters)

    def _read(self, chunk: _Chunk) -> int | None:
        try:
            with memoryview(chunk.buf) as view:
                return os.preadv(self.fd, [view[: chunk.length]], chunk.offset)
        except OSError as exc:
            if exc.errno == errno.EINVAL:
                self.broken = True                # alignment refused: stop trying
            return None

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
            for chunk in self.queue:              # never to be read: nobody waits on
                chunk.ready = chunk.failed = True
                _wake(chunk.waiters)
        for t in self.threads:
            t.join()
        os.close(self.fd)


def from_newest_write(writes: Iterable[tuple[int, bytes | memoryview]], offset: int,
                      length: int) -> bytes | None:
    """The bytes at [offset, offset + length) from the first of `writes` (newest
    first: (offset, data)) that touches them, if it holds them all; None if it holds
    only part, or none does."""
    for start, data in writes:
        if start < offset + length and offset < start + len(data):
            if start <= offset and offset + length <= start + len(data):
                return bytes(data[offset - start : offset - start + length])
            return None
    return None


def _overlaid(base: bytes, offset: int, writes: list[tuple[int, memoryview]]) -> bytes:
    """`base` (the device's bytes from `offset`) with `writes` laid over it in order."""
    out = bytearray(base)
    end = offset + len(out)
    for start, data in writes:
        lo, hi = max(start, offset), min(start + len(data), end)
        if lo < hi:
            out[lo - offset : hi - offset] = data[lo - start : hi - start]
    return bytes(out)


class _WriteBehind:
    """A daemon thread performing queued data writes, in order, off the caller's thread.

    The FUSE server answers a write once its data is queued here, so the copy into
    the device's page cache (and starting its writeback) overlaps with receiving the
    next request instead of adding to every request's latency. BlockDevice waits for
    the queue to empty before any other write, and before a read of bytes a queued
    write touches, so the device sees every operation in the order it was asked for
    and a read sees every write before it; durability still comes only from flush(). The first
    failed write is kept and reported by every later wait (as the kernel reports a
    failed writeback at fsync).

    A queue that is one contiguous run of aligned writes is held back until it holds
    WRITE_BATCH bytes and then written with one pwrite per staging buffer (a
    sequential writer's 1 MiB requests become 4 MiB device writes); anyone waiting
    for the queue (drain, wait_room, stop) has it written at once."""

    def __init__(self, fd: int, path: str, limit: int) -> None:
        self.fd = fd
        self.path = path
        self.limit = limit
        self.cond = threading.Condition()
        self.items: deque[tuple[int, memoryview]] = deque()
        self.pending = 0                  # queued bytes, including the one being written
        self.waiting = 0                  # queued bytes not yet taken by the thread
        self.run_end: int | None = None   # where the queue, if one aligned run, ends
        self.writing: list[tuple[int, memoryview]] = []   # taken, being written
        self.urgent = 0                   # callers waiting for the queue: no holding back
        self.error: str | None = None
        self.refused: str | None = None   # BlockDevice.refuse_writes: queued writes fail
        self.elsewhere: list[tuple[int, list[memoryview]]] = []   # take_all's, in flight
        self.settle_elsewhere: Callable[[], bool] | None = None    # FlushRing.settle_here
        self.stopping = False
        self.direct = _DirectWriter.open(path)
        self.thread = failover.start_thread(self._run, "write-behind")

    def submit(self, offset: int, data: memoryview) -> None:
        if not self.has_room(len(data)):
            self.wait_room(len(data))    # writes out what is held back meanwhile
        with self.cond:
            self._raise_error()
            if not self.items:
                self.run_end = offset
            self._supersede_tail(offset, len(data))
            self.items.append((offset, data))
            self.pending += len(data)
            self.waiting += len(data)
            self._extend_run(offset, len(data))
            if not self._hold_back():
                self.cond.notify_all()

    def _extend_run(self, offset: int, length: int) -> None:
        """Keep run_end for a write appended to the queue (called under cond)."""
        if self.run_end == offset and not (offset | length) % BLOCK_SIZE:
            self.run_end = offset + length
        else:
            self.run_end = None

    def _supersede_tail(self, offset: int, length: int) -> None:
        """Cut off the last queued write's tail blocks when this write rewrites them
        all: a writer whose requests end inside a block (the kernel splits a direct
        write at the page edges of the user's buffer) sends the rest of that block
        next, as a whole block assembled from the queued copy; cutting the old one
        keeps the queue one contiguous run and writes the block once (called under
        cond, on the thread's untaken items only)."""
        if not self.items:
            return
        start, data = self.items[-1]
        end = start + len(data)
        if not start < offset < end <= offset + length or (offset - start) % BLOCK_SIZE:
            return
        cut = end - offset
        self.items[-1] = (start, data[: offset - start])
        self.pending -= cut
        self.waiting -= cut
        if self.run_end == end:
            self.run_end = offset

    def owed_writes(self, offset: int, length: int) -> list[tuple[int, memoryview]] | None:
        """The queued and in-flight writes touching [offset, offset + length), oldest
        first (the device may or may not hold each yet: a reader lays them over what
        it reads, in this order); None when a write failed (the reader reports it)."""
        with self.cond:
            if self.error is not None:
                return None
            return [(start, data) for start, data in itertools.chain(self.writing, self.items)
                    if start < offset + length and offset < start + len(data)]

    def owes_within(self, offset: int, length: int) -> Callable[[int, int], bool]:
        """Whether a queued or in-flight write touches a part of [offset, offset +
        length), or a write failed: the device does not hold those bytes as they will
        be (a direct read-ahead leaves them out); bytes no unfinished write touches are
        on it. One look at the queue now for all the parts: a walk of the whole queue
        under its lock for each 4 MiB chunk of a read-ahead stalled the event loop
        0.38 s under stress-ng's iomix, with thousands of small writes queued. Writes
        finished meanwhile still count (a chunk left out is read plainly); none can be
        queued meanwhile (the caller is the thread that queues them)."""
        owed = self.owed_writes(offset, length)
        if owed is None:
            return lambda _o, _n: True
        return lambda o, n: any(s < o + n and o < s + len(d) for s, d in owed)

    def newest_copy(self, offset: int, length: int) -> bytes | None:
        """The bytes at [offset, offset + length) as the queue will leave them, when
        one queued or in-flight write holds them all and no later one touches them;
        None when they are not all in one (read the device after a drain)."""
        with self.cond:
            return from_newest_write(itertools.chain(reversed(self.items), self.writing),
                               offset, length)

    def _hold_back(self) -> bool:
        """Leave the queue for now: it is one contiguous run, aligned for the direct
        writer, shorter than a batch, and nobody waits for it (called under cond)."""
        return not (self.urgent or self.stopping or self.run_end is None
                    or self.waiting >= WRITE_BATCH or self.direct is None)

    def has_room(self, length: int) -> bool:
        return self.pending == 0 or self.pending + length <= self.limit

    def wait_room(self, length: int) -> None:
        with self._urgently():
            while not self.has_room(length) and not self.error:
                self._wait()

    def drain(self) -> None:
        """Wait until every queued write is done; raise if one failed."""
        with self._urgently():
            while self.pending and not self.error:
                self._wait()
            self._raise_error()

    @contextlib.contextmanager
    def _urgently(self):
        """Hold cond, with the thread told to write everything queued meanwhile."""
        with self.cond:
            self.urgent += 1
            self.cond.notify_all()
            try:
                yield
            finally:
                self.urgent -= 1

    def _raise_error(self) -> None:
        if self.error is not None:
            raise StorageError(f"{self.path}: {self.error}")

    def _run(self) -> None:
        while True:
            with self.cond:
                while self.elsewhere or (
                        not self.stopping and (not self.items or self._hold_back())):
                    self.cond.wait()
                if not self.items:
                    return
                offset, pieces = self._take_run()
                self.writing = self._placed(offset, pieces)
            refused = self.refused
            failed = (f"write at {offset}: {refused}" if refused is not None
                      else self._write(offset, pieces))
            with self.cond:
                self._written(sum(len(d) for d in pieces), failed)

    def _written(self, size: int, failed: str | None) -> None:
        """(Under cond.) The writes taken are over: `failed` says how."""
        if failed is not None and self.error is None:
            self.error = failed
        self.pending -= size
        self.writing = []
        if self.error is not None:
            self.pending -= sum(len(d) for _o, d in self.items)
            self.waiting = 0
            self.run_end = None
            self.items.clear()
        self.cond.notify_all()

    # -- the whole queue, written elsewhere (a flush ring) ----------------------------
    def take_all(self, most: int) -> list[tuple[int, list[memoryview]]] | None:
        """Hand the whole queue to the caller to write (an fdatasync's own small
        overwrite, written and flushed in one io_uring submission), when the thread is
        idle, the queue holds at most `most` bytes of whole aligned blocks and no
        write failed; None otherwise. Until `taken_written` or `give_back`, the
        thread writes nothing (later writes stay behind these) and readers of these
        bytes lay them over the device's, as for the thread's own writes."""
        with self.cond:
            if (self.writing or self.elsewhere or not self.items or self.error
                    or self.refused or self.waiting > most or self.direct is None
                    or any((o | len(d)) % BLOCK_SIZE for o, d in self.items)):
                return None
            runs = []
            while self.items:
                runs.append(self._take_run())
            self.writing = [p for offset, pieces in runs for p in self._placed(offset, pieces)]
            self.elsewhere = runs
            return runs

    def taken_written(self, failed: str | None) -> None:
        """The writes take_all handed out are over: `failed` says how."""
        with self.cond:
            size = sum(len(d) for _o, pieces in self.elsewhere for d in pieces)
            self.elsewhere = []
            self._written(size, failed)

    def give_back(self) -> None:
        """The writes take_all handed out were not made: queue them again, first."""
        with self.cond:
            placed = [p for offset, pieces in self.elsewhere
                      for p in self._placed(offset, pieces)]
            self.items.extendleft(reversed(placed))
            self.waiting += sum(len(d) for _o, d in placed)
            self.run_end = None          # the thread writes them at once
            self.elsewhere = []
            self.writing = []
            self.cond.notify_all()

    def _wait(self) -> None:
        """(Under cond.) Wait for the thread, or for writes in flight elsewhere: on the
        thread that must finish those (the event loop's, whose reaper cannot run
        while we block it) they are finished here."""
        if not (self.elsewhere and self.settle_elsewhere is not None
                and self.settle_elsewhere()):
            self.cond.wait()

    @staticmethod
    def _placed(offset: int, pieces: list[memoryview]) -> list[tuple[int, memoryview]]:
        """Each piece of a run with its own offset."""
        placed = []
        for piece in pieces:
            placed.append((offset, piece))
            offset += len(piece)
        return placed

    def _take_run(self) -> tuple[int, list[memoryview]]:
        """The first queued write and those continuing it, up to WRITE_BATCH bytes when
        they can go through the direct writer together (called under cond)."""
        offset, data = self.items.popleft()
        pieces, end, size = [data], offset + len(data), len(data)
        if self.direct is not None and not (offset | len(data)) % BLOCK_SIZE:
            while self.items and size < WRITE_BATCH:
                nxt, more = self.items[0]
                if nxt != end or len(more) % BLOCK_SIZE or size + len(more) > WRITE_BATCH:
                    break
                self.items.popleft()
                pieces.append(more)
                end += len(more)
                size += len(more)
        self.waiting -= size
        self.run_end = self.items[0][0] if self.items else None
        for o, d in self.items:          # what is left, once per batch taken
            self._extend_run(o, len(d))
        return offset, pieces

    def _write(self, offset: int, pieces: list[memoryview]) -> str | None:
        if self.direct is not None and not (offset | len(pieces[0])) % BLOCK_SIZE:
            try:
                self.direct.write(offset, pieces)
                return None
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    return f"write at {offset}: {exc.strerror}"
                self.direct.close()      # alignment refused: buffered from now on
                self.direct = None
        for data in pieces:
            failed = self._write_buffered(offset, data)
            if failed is not None:
                return failed
            offset += len(data)
        return None

    def _write_buffered(self, offset: int, data: memoryview) -> str | None:
        try:
            done = 0
            while done < len(data):
                done += os.pwrite(self.fd, data[done:], offset + done)
        except OSError as exc:
            return f"write at {offset}: {exc.strerror}"
        if len(data) >= WRITEBACK_TRIGGER and _sync_file_range is not None:
            # start the writeback now (best effort): a streaming writer keeps the disk
            # busy all along instead of leaving everything to the next flush
            _sync_file_range(self.fd, offset, len(data), SYNC_FILE_RANGE_WRITE)
        return None

    def stop(self) -> None:
        """Finish the queued writes and end the thread (the fd must stay open until then)."""
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        self.thread.join()
        if self.direct is not None:
            self.direct.close()
            self.direct = None


class BlockAddressed:
    """Whole blocks by number, over the byte-addressed pread/pwrite of the class that
    mixes it in (BlockDevice, IscsiDevice)."""

    path: str
    _write_guard: Callable[[], None] | None = None

    def guard_writes(self, check: Callable[[], None] | None) -> None:
        """Run check() before every write and flush (None: no more checks); it raises
        StorageError to refuse that write. A poison-pill watcher whose last read of its
        slot is too old reads the slot again there (clusterfs.fence.poison_pill)."""
        self._write_guard = check

    def _guard(self) -> None:
        if self._write_guard is not None:
            self._write_guard()

    def pread(self, offset: int, length: int) -> bytes:
        raise NotImplementedError

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        raise NotImplementedError

    def read(self, blkno: int, count: int = 1) -> bytes:
        length = count * BLOCK_SIZE
        data = self.pread(blkno * BLOCK_SIZE, length)
        if len(data) != length:
            raise StorageError(f"{self.path}: short read at block {blkno}")
        return data

    def write(self, blkno: int, data: bytes | bytearray | memoryview) -> None:
        self.pwrite(blkno * BLOCK_SIZE, data)


class BlockDevice(BlockAddressed):
    def __init__(self, path: str, writable: bool = True) -> None:
        self.path = path
        try:
            self.fd = os.open(path, (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC)
        except OSError as exc:
            raise StorageError(f"{path}: {exc.strerror}") from exc
        st = os.fstat(self.fd)
        if stat.S_ISBLK(st.st_mode):
            self.size = os.lseek(self.fd, 0, os.SEEK_END)
        elif stat.S_ISREG(st.st_mode):
            self.size = st.st_size
        else:
            os.close(self.fd)
            raise StorageError(f"{path}: not a block device or regular file")
        self.blocks = self.size // BLOCK_SIZE
        self.reads = 0
        self.writes = 0
        self._advisor: _Advisor | None = None
        self._behind: _WriteBehind | None = None
        self._ahead: _DirectReadAhead | None = None
        self._ahead_tried = False
        self._direct: _DirectIO | None = None
        self._refused: str | None = None
        self._ring: FlushRing | None = None
        self._ring_tried = False
        self.ring_flushes = 0             # flushes (and writes before them) by io_uring
        self.ring_reads = 0               # reads by io_uring (the event loop went on)

    def bypass_page_cache(self) -> bool:
        """Make every later read and write go around the host's page cache (O_DIRECT);
        False where the device or file refuses O_DIRECT (then nothing changes)."""
        if self._direct is None:
            fd = _open_direct(self.path, os.O_RDWR)
            if fd is not None:
                self._direct = _DirectIO(fd)
        return self._direct is not None

    def refuse_writes(self, reason: str) -> None:
        """From now on every write and flush fails with `reason`, writes still queued
        included (a node told to stop writing: a poison pill, a withdraw). Reads work."""
        self._refused = reason
        if self._behind is not None:
            self._behind.refused = reason

    def _check_refused(self, what: str) -> None:
        if self._refused is not None:
            raise StorageError(f"{self.path}: {what}: {self._refused}")
        self._guard()

    # -- write-behind of file data ---------------------------------------------------
    def start_write_behind(self) -> None:
        """Open the write-behind's O_DIRECT descriptor, map its staging buffer and start
        its thread now rather than at the first data write (a mount does it at start:
        write-back then needs nothing new from the host; clusterfs.failover)."""
        if self._behind is None:
            self._behind = _WriteBehind(self.fd, self.path, WRITE_BEHIND_LIMIT)
            if self._ring is not None:
                self._behind.settle_elsewhere = self._ring.settle_here

    def start_read_ahead(self) -> None:
        """Start the direct read-ahead (its threads, and its buffers mapped in the
        background) now rather than at the first sequential read."""
        if not self._ahead_tried:
            self._ahead_tried = True
            self._ahead = _DirectReadAhead.open(self.path) if DIRECT_READ_AHEAD else None

    def start_flush_ring(self) -> None:
        """Open the io_uring that flushes without a worker thread now rather than at
        the first flush (a mount does it at start, beside start_write_behind)."""
        if not self._ring_tried:
            self._ring_tried = True
            self._ring = FlushRing.open()
            if self._ring is not None and self._behind is not None:
                self._behind.settle_elsewhere = self._ring.settle_here

    def write_behind(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Queue a data write: done by a helper thread, before any later I/O on this
        device (every other write waits for the queue first, a read for the writes of
        its bytes). `data` must not change
        afterwards. Failures surface at the next drain (flush, read, write)."""
        self._check_refused(f"write at {offset}")
        self.start_write_behind()
        if self._ahead is not None:
            self._ahead.invalidate(offset, len(data))
        self.writes += 1
        self._behind.submit(offset, memoryview(data))

    @property
    def behind_pending(self) -> int:
        """Bytes of queued data writes not yet done."""
        return self._behind.pending if self._behind is not None else 0

    def behind_has_room(self, length: int) -> bool:
        return self._behind is None or self._behind.has_room(length)

    def wait_behind_room(self, length: int) -> None:
        """Block until a write of `length` bytes can be queued without waiting (to be
        called from a worker thread, so the event loop never blocks on the queue)."""
        if self._behind is not None:
            self._behind.wait_room(length)

    def drain(self) -> None:
        """Wait for every queued data write; StorageError if one of them failed."""
        if self._behind is not None and (self._behind.pending or self._behind.error):
            self._behind.drain()

    def read_newest(self, blkno: int) -> bytes:
        """One block as the device will hold it once the queue is written: from the
        newest queued write of it, without waiting for the queue (a writer whose
        requests end inside a block reads that block back at its next request),
        else from the device, queued writes laid over."""
        copy = self.queued_copy(blkno)
        return copy if copy is not None else self.read(blkno)

    def queued_copy(self, blkno: int, wait: bool = True) -> bytes | None:
        """The block as the newest queued write of it holds it whole; None when no
        queued write does (read it). (`wait`: the queue's lock is only ever held
        briefly here.)"""
        if self._behind is None:
            return None
        return self._behind.newest_copy(blkno * BLOCK_SIZE, BLOCK_SIZE)

    # -- ordinary I/O (each waits for the queued writes it must follow) ----------------
    def pread(self, offset: int, length: int) -> bytes:
        # Queued writes of these bytes are laid over what the device holds, in queue
        # order, instead of waited for: a write queued must be written in order, so
        # waiting for one waited for the whole queue (up to WRITE_BEHIND_LIMIT of
        # scattered writes, seconds on a busy disk) on the event loop, which calls
        # this, past the failure timeout: the other nodes fenced a live node
        # (stress-ng's fpunch, then iomix with three instances on each of three nodes).
        owed = self._owed(offset, length)
        data = self._read_device(offset, length)
        return _overlaid(data, offset, owed) if owed else data

    def _owed(self, offset: int, length: int) -> list[tuple[int, memoryview]]:
        """The queued and in-flight writes a read of these bytes lays over what the
        device holds; StorageError if a queued write failed."""
        if self._behind is None:
            return []
        owed = self._behind.owed_writes(offset, length)
        if owed is None:
            self._behind.drain()         # a write failed: raises it
            return []
        return owed

    async def read_async(self, offset: int, length: int, off_loop: bool = False) -> bytes:
        """pread() that leaves the event loop free while the device reads, through the
        io_uring; where the ring cannot take it (none, full, longer than its buffers),
        a plain pread as before, or with `off_loop` one in a worker thread. Queued
        writes are laid over it as pread does (those queued before it started: a
        later one is a concurrent write)."""
        owed = self._owed(offset, length)
        data = await self._read_device_async(offset, length, off_loop)
        return _overlaid(data, offset, owed) if owed else data

    async def _read_device_async(self, offset: int, length: int, off_loop: bool) -> bytes:
        if self._ring is not None:
            fd = self._direct.fd if self._direct is not None and \
                not (offset | length) % BLOCK_SIZE else self.fd
            try:
                got = await self._ring.read(fd, offset, length)
            except OSError as exc:
                raise StorageError(f"{self.path}: read at {offset}: {exc.strerror}") from exc
            if got is not None:
                self.reads += 1
                self.ring_reads += 1
                return got
        if off_loop:
            return await workers.run(self._read_device, offset, length)
        return self._read_device(offset, length)

    def _read_device(self, offset: int, length: int) -> bytes:
        try:
            self.reads += 1
            if self._direct is not None and not (offset | length) % BLOCK_SIZE:
                return self._direct.pread(offset, length)
            return os.pread(self.fd, length, offset)
        except OSError as exc:
            raise StorageError(f"{self.path}: read at {offset}: {exc.strerror}") from exc

    def read_data(self, offset: int, length: int) -> bytes | memoryview:
        """File data: from a direct read-ahead chunk when one covers it (a view valid
        until the next call on this device), else a plain pread."""
        if self._ahead is not None:
            # A chunk never overlaps a queued write (none did when it was submitted,
            # and a write queued since dropped it), so only a failed write is waited
            # for, to be reported; the queue is not (the event loop calls this).
            if self._behind is not None and self._behind.error:
                self._behind.drain()
            view = self._ahead.take(offset, length)
            if view is not None:
                self.reads += 1
                return view
        return self.pread(offset, length)

    async def data_ready(self, offset: int, length: int) -> bool:
        """Make a read_data() of the range answerable at once, with the event loop free
        meanwhile: True when a read-ahead chunk holds it (waited for if still being
        read; a view of it is then valid until the next call on this device), False
        when none does (read it with read_async)."""
        if self._ahead is None:
            return False
        chunk = self._ahead.covering(offset, length)
        if chunk is None:
            return False
        await self._ahead.wait_ready(chunk)
        return not chunk.failed

    def forget_read_ahead(self) -> None:
        """Drop every read-ahead chunk (another node may change what they hold)."""
        if self._ahead is not None:
            self._ahead.invalidate(0, self.size)

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self._check_refused(f"write at {offset}")
        self.drain()
        if self._ahead is not None:
            self._ahead.invalidate(offset, len(data))
        try:
            self.writes += 1
            if self._direct is not None:
                self._direct.pwrite(offset, data)
                return
            done = os.pwrite(self.fd, data, offset)
            while done < len(data):
                done += os.pwrite(self.fd, memoryview(data)[done:], offset + done)
        except OSError as exc:
            raise StorageError(f"{self.path}: write at {offset}: {exc.strerror}") from exc

    def advise_willneed(self, blkno: int, count: int) -> None:
        """Start reading blocks into the cache in the background (best effort). The
        fadvise call itself blocks while it submits the I/O (about a tenth of a
        sequential read's time when made inline), so a helper thread makes it."""
        self.start_read_ahead()
        if self._ahead is not None and not self._ahead.broken:
            # A direct read must not overtake a queued write: a chunk that a queued
            # write touches is left out (its bytes are read plainly, after that write)
            # instead of waiting for the queue here, on the event loop.
            behind = self._behind
            self._ahead.submit(blkno * BLOCK_SIZE, count * BLOCK_SIZE,
                               skip=behind.owes_within(blkno * BLOCK_SIZE, count * BLOCK_SIZE)
                               if behind is not None else None)
            return
        if self._advisor is None:
            self._advisor = _Advisor()
        self._advisor.queue.put((self.fd, blkno * BLOCK_SIZE, count * BLOCK_SIZE))

    async def flush_without_thread(self) -> bool:
        """Flush from the event loop with no worker thread (io_uring), writing first
        what the write-behind holds when that is a short run its thread has not
        taken (an fdatasync's own overwrite): True once flushed. False, having done
        nothing, when it cannot (no io_uring, the thread is writing, more is
        queued): flush() in a worker thread then."""
        return await self.run_without_thread([None])

    async def run_without_thread(self, steps: list[list[tuple[int, bytes]] | None]) -> bool:
        """From the event loop, with no worker thread (io_uring): the write-behind's
        queue first (when it is a short run its thread has not taken), then `steps`
        in order, each once the one before is done (a failure cancels the rest): a
        list of (offset, whole blocks) writes, or None for a flush (a journal commit:
        log blocks, flush, commit block, flush). True once all are done; False,
        having done nothing, when the ring cannot take them (none, busy, too much
        queued or asked): then in a worker thread, as before. StorageError if one
        failed (a failed queued write is kept and reported, as the thread's are)."""
        self.start_flush_ring()
        ring = self._ring
        if ring is None:
            return False
        self._check_refused("write")
        behind = self._behind
        meta_fd = self._direct.fd if self._direct is not None else self.fd
        asked: list[Step] = []
        for step in steps:
            if step is None:
                asked.append(("fsync", self.fd))
            else:
                asked.extend(("write", meta_fd, off, [memoryview(data)]) for off, data in step)
        length = sum(len(d) for step in steps if step for _o, d in step)
        try:
            taken: list[Step] = []
            if behind is not None and behind.pending:
                if behind.direct is None or not ring.can_chain(
                        behind.waiting + length, len(asked) + WRITE_BUFFER // BLOCK_SIZE):
                    return False
                runs = behind.take_all(WRITE_BUFFER - length)
                if runs is None:
                    return False
                taken = [("write", behind.direct.fd, off, pieces) for off, pieces in runs]
            elif behind is not None and behind.error:
                behind.drain()           # raises: a failed write is reported here
            for step in asked:
                if step[0] == "write" and self._ahead is not None:
                    self._ahead.invalidate(step[2], sum(len(p) for p in step[3]))

            def done(results: list[int]) -> None:
                if taken:
                    failed = first_failure(results[: len(taken)], taken)
                    behind.taken_written(None if failed is None else failed.strerror)

            ok = await ring.chain(taken + asked, done)
            if not ok:
                if taken:
                    behind.give_back()
                return False
            self.ring_flushes += 1
            self.writes += sum(1 for step in asked if step[0] == "write")
            return True
        except OSError as exc:
            raise StorageError(f"{self.path}: {exc.strerror or exc}") from exc

    def flush(self) -> None:
        self._check_refused("flush")
        self.drain()
        try:
            os.fsync(self.fd)
        except OSError as exc:
            raise StorageError(f"{self.path}: flush: {exc.strerror}") from exc

    def close(self) -> None:
        if self._ring is not None:
            self._ring.close()           # its writes in flight finish first
            self._ring = None
        if self._behind is not None:
            self._behind.stop()          # a failure left in it was reported or is moot
            self._behind = None
        if self._ahead is not None:
            self._ahead.stop()
            self._ahead = None
        if self._advisor is not None:
            self._advisor.stop()
            self._advisor = None
        if self._direct is not None:
            self._direct.close()
            self._direct = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def statistics(self) -> dict[str, int]:
        return {"reads": self.reads, "writes": self.writes, "blocks": self.blocks,
                "ring_flushes": self.ring_flushes, "ring_reads": self.ring_reads,
                "ring_reads_at_once": self._ring.read_inline if self._ring is not None else 0}


class WritesAtOnce:
    """The write-behind and read-ahead interface of BlockDevice for a device that has
    neither (iSCSI, proxy): data is written at once, so failures surface at the write
    itself rather than at a later drain, and there is nothing to advise or forget."""

    def start_write_behind(self) -> None:
        pass

    def write_behind(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self.pwrite(offset, data)  # type: ignore[attr-defined]

    @property
    def behind_pending(self) -> int:
        return 0

    def behind_has_room(self, length: int) -> bool:
        return True

    def wait_behind_room(self, length: int) -> None:
        pass

    def drain(self) -> None:
        pass

    def read_newest(self, blkno: int) -> bytes:
        return self.read(blkno)  # type: ignore[attr-defined]

    def queued_copy(self, blkno: int, wait: bool = True) -> bytes | None:
        return None                      # nothing is queued here

    def advise_willneed(self, blkno: int, count: int) -> None:
        pass

    def forget_read_ahead(self) -> None:
        pass

    async def read_async(self, offset: int, length: int, off_loop: bool = True) -> bytes:
        """pread() in a worker thread: the event loop goes on while the request waits
        on the network (the full io_timeout applies there, not the event loop's
        shorter one)."""
        return await workers.run(self.pread, offset, length)

    async def data_ready(self, offset: int, length: int) -> bool:
        return False                     # no read-ahead here

    def start_read_ahead(self) -> None:
        pass

    def start_flush_ring(self) -> None:
        pass

    async def flush_without_thread(self) -> bool:
        return False                     # flush() in a worker thread

    async def run_without_thread(self, steps: list[list[tuple[int, bytes]] | None]) -> bool:
        return False                     # the journal's writes in a worker thread
