"""Typed wrappers over the cffi module built from native/ (clusterfs._native).

C errors become OSError/NativeError here, so callers never touch cffi.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from clusterfs.errors import NativeError

try:
    from clusterfs._native import ffi, lib
except ModuleNotFoundError as missing:  # pragma: no cover - depends on how it was installed
    # Importing from a source tree that was installed non-editable finds this package but not
    # the compiled module (it went to site-packages); say how to fix it instead of a bare error.
    raise NativeError(
        f"clusterfs._native is not built next to {os.path.dirname(__file__)}: "
        "run `pip install -e .` (or tools/install.sh) in the source tree"
    ) from missing

__all__ = ["crc32c", "crc32c_hardware", "lock_memory", "set_io_flusher", "hold_heap",
           "top_up_heap", "heap_stats", "reserve_arenas", "top_up_arenas",
           "arenas_for_failover", "arena_stats", "BufferPool", "Uring", "ffi", "lib"]


def crc32c(data: bytes | bytearray | memoryview, crc: int = 0) -> int:
    """CRC32C of data, continuing from crc (0 to start)."""
    buf = ffi.from_buffer(data)
    return lib.cfs_crc32c(crc, buf, len(buf))


def crc32c_hardware() -> bool:
    return bool(lib.cfs_crc32c_hw())


def _check(err: int, what: str) -> None:
    """OSError for a C call of ours that returned an errno (0: done)."""
    if err:
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _counters(read: Callable[[Any], None], fields: tuple[str, ...]) -> dict[str, int]:
    """A C call that fills a uint64_t array, as a dict by `fields`."""
    out = ffi.new("uint64_t[]", len(fields))
    read(out)
    return dict(zip(fields, out, strict=True))


def lock_memory() -> None:
    """mlockall(MCL_CURRENT|MCL_FUTURE); raises OSError if refused."""
    _check(lib.cfs_mlockall(), "mlockall")


def set_io_flusher() -> None:
    """prctl(PR_SET_IO_FLUSHER): our allocations must not recurse into FS reclaim."""
    _check(lib.cfs_set_io_flusher(), "prctl(PR_SET_IO_FLUSHER)")


def hold_heap(headroom: int) -> None:
    """One malloc arena, requests up to 32 MiB from the heap, no trim, and `headroom`
    free bytes in the heap (native/heap.c); raises OSError if refused."""
    _check(lib.cfs_heap_hold(headroom), "malloc heap hold")


def top_up_heap(headroom: int) -> None:
    """Grow the heap so it holds `headroom` free bytes again (OSError if not)."""
    _check(lib.cfs_heap_top_up(headroom), "malloc heap top-up")


HEAP_FIELDS = ("heap", "mmapped", "in_use", "free", "top_free")
ARENA_FIELDS = ("slots", "slots_free", "slots_taken", "from_kernel", "from_kernel_in_failover")


def heap_stats() -> dict[str, int]:
    """malloc's figures in bytes (HEAP_FIELDS): heap size, mmapped chunks, in use,
    free, free at the top."""
    return _counters(lib.cfs_heap_stats, HEAP_FIELDS)


def reserve_arenas(count: int, slot: int = 1 << 20) -> None:
    """Keep `count` pymalloc arena slots of `slot` bytes mapped for the failover path
    (native/heap.c); once per process. With count 0 there is no reserve, but the
    arenas taken from the kernel are counted all the same. OSError if refused."""
    _check(lib.cfs_arenas_reserve(count, slot), "pymalloc arena reserve")


def top_up_arenas() -> None:
    """Map reserve slots until as many are free as were reserved (outside the path)."""
    _check(lib.cfs_arenas_top_up(), "pymalloc arena top-up")


def arenas_for_failover(on: bool) -> None:
    """While on, new pymalloc arenas come from the reserve (then from the kernel)."""
    lib.cfs_arenas_failover(int(on))


def arena_stats() -> dict[str, int]:
    """The arena reserve's counters (ARENA_FIELDS): slots, free, taken ever, arenas
    from the kernel since the reserve was made, of them while the failover path was on."""
    return _counters(lib.cfs_arenas_stats, ARENA_FIELDS)


class BufferPool:
    """A preallocated pool of page-aligned buffers (the reserve).

    get() returns a writable memoryview over one buffer, or None when the
    reserve is empty; put() gives it back. The buffers' memory is allocated once, at
    construction (and locked with the rest by mlockall); get() and put() create only a
    small Python handle each, never a buffer, so the write-back path can still stage
    blocks under memory pressure.
    """

    def __init__(self, nbufs: int, bufsize: int = 4096) -> None:
        self._pool = lib.cfs_pool_create(nbufs, bufsize)
        if self._pool == ffi.NULL:
            raise NativeError(f"cannot create buffer pool of {nbufs} x {bufsize}")
        self.bufsize = bufsize
        self.nbufs = nbufs
        self._addr: dict[int, object] = {}  # id(view) -> cdata pointer

    def get(self) -> memoryview | None:
        ptr = lib.cfs_pool_get(self._pool)
        if ptr == ffi.NULL:
            return None
        view = memoryview(ffi.buffer(ptr, self.bufsize))
        self._addr[id(view)] = ptr
        return view

    def put(self, view: memoryview) -> None:
        ptr = self._addr.pop(id(view), None)
        if ptr is None or lib.cfs_pool_put(self._pool, ptr) != 0:
            raise NativeError("buffer does not belong to this pool")

    @property
    def free(self) -> int:
        return lib.cfs_pool_free_count(self._pool)

    def close(self) -> None:
        if self._pool != ffi.NULL:
            lib.cfs_pool_destroy(self._pool)
            self._pool = ffi.NULL

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass


class Uring:
    """An io_uring (native/uring.c) that signals `eventfd` as requests complete: device
    writes and flushes queued, then submitted together. Raises OSError where the
    kernel refuses io_uring (ENOSYS, or EPERM under a seccomp filter or
    kernel.io_uring_disabled)."""

    REAP_MAX = 64

    def __init__(self, entries: int, eventfd: int) -> None:
        err = ffi.new("int *")
        self._ring = lib.cfs_uring_open(entries, eventfd, err)
        if self._ring == ffi.NULL:
            raise OSError(err[0], f"io_uring: {os.strerror(err[0])}")
        self._tags = ffi.new("uint64_t[]", self.REAP_MAX)
        self._results = ffi.new("int32_t[]", self.REAP_MAX)

    @staticmethod
    def _check(err: int, what: str) -> None:
        if err:
            raise OSError(-err, f"io_uring {what}: {os.strerror(-err)}")

    def queue_fsync(self, fd: int, link: bool, tag: int) -> None:
        """Queue an fsync; with `link` the next queued request waits for it (and is
        cancelled if it fails)."""
        self._check(lib.cfs_uring_queue_fsync(self._ring, fd, int(link), tag), "fsync")

    def queue_write(self, fd: int, buf: object, offset: int, link: bool, tag: int) -> None:
        """Queue a write of `buf` (cffi buffer: it must stay alive until completion);
        with `link` the next queued request waits for it and is cancelled if it fails."""
        cbuf = ffi.from_buffer(buf)
        self._check(lib.cfs_uring_queue_write(self._ring, fd, cbuf, len(cbuf), offset,
                                              int(link), tag), "write")

    def queue_read(self, fd: int, buf: object, offset: int, tag: int) -> None:
        """Queue a read into `buf` (writable, alive until completion) of up to its
        length; the result is the bytes read, short at the device's end."""
        cbuf = ffi.from_buffer(buf, require_writable=True)
        self._check(lib.cfs_uring_queue_read(self._ring, fd, cbuf, len(cbuf), offset, tag),
                    "read")

    def submit(self) -> None:
        self._check(lib.cfs_uring_submit(self._ring), "submit")

    def wait(self, count: int) -> None:
        """Block until `count` completions are ready to reap."""
        self._check(lib.cfs_uring_wait(self._ring, count), "wait")

    def reap(self) -> list[tuple[int, int]]:
        """The completions so far: (tag, result: bytes written, 0, or -errno) each."""
        done: list[tuple[int, int]] = []
        while n := lib.cfs_uring_reap(self._ring, self._tags, self._results, self.REAP_MAX):
            done.extend((self._tags[i], self._results[i]) for i in range(n))
            if n < self.REAP_MAX:
                break
        return done

    def close(self) -> None:
        if self._ring != ffi.NULL:
            lib.cfs_uring_close(self._ring)
            self._ring = ffi.NULL
