"""Typed wrappers over the cffi module built from native/ (clusterfs._native).

C errors become OSError/NativeError here, so callers never touch cffi.
"""

from __future__ import annotations

import os

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

__all__ = ["crc32c", "crc32c_hardware", "lock_memory", "set_io_flusher", "BufferPool", "ffi", "lib"]


def crc32c(data: bytes | bytearray | memoryview, crc: int = 0) -> int:
    """CRC32C of data, continuing from crc (0 to start)."""
    buf = ffi.from_buffer(data)
    return lib.cfs_crc32c(crc, buf, len(buf))


def crc32c_hardware() -> bool:
    return bool(lib.cfs_crc32c_hw())


def lock_memory() -> None:
    """mlockall(MCL_CURRENT|MCL_FUTURE); raises OSError if refused."""
    err = lib.cfs_mlockall()
    if err:
        raise OSError(err, f"mlockall: {os.strerror(err)}")


def set_io_flusher() -> None:
    """prctl(PR_SET_IO_FLUSHER): our allocations must not recurse into FS reclaim."""
    err = lib.cfs_set_io_flusher()
    if err:
        raise OSError(err, f"prctl(PR_SET_IO_FLUSHER): {os.strerror(err)}")


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
