"""BlockDevice: a loop device, block device or plain image file, read and written in blocks.

Buffered I/O plus fsync (os.fsync on the device fd is the cache flush). On a
shared disk seen by several hosts this must become O_DIRECT with aligned buffers
(the page cache of one host does not see another host's writes); see
docs/journal.md. For one node buffered I/O is both correct and faster.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import queue
import stat
import threading

from clusterfs.errors import StorageError
from clusterfs.format.block import BLOCK_SIZE

SYNC_FILE_RANGE_WRITE = 2


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
        self.thread = threading.Thread(target=self._run, name="fadvise", daemon=True)
        self.thread.start()

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


class BlockDevice:
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

    def read(self, blkno: int, count: int = 1) -> bytes:
        length = count * BLOCK_SIZE
        data = self.pread(blkno * BLOCK_SIZE, length)
        if len(data) != length:
            raise StorageError(f"{self.path}: short read at block {blkno}")
        return data

    def write(self, blkno: int, data: bytes | bytearray | memoryview) -> None:
        self.pwrite(blkno * BLOCK_SIZE, data)

    def pread(self, offset: int, length: int) -> bytes:
        try:
            self.reads += 1
            return os.pread(self.fd, length, offset)
        except OSError as exc:
            raise StorageError(f"{self.path}: read at {offset}: {exc.strerror}") from exc

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        try:
            self.writes += 1
            done = os.pwrite(self.fd, data, offset)
            while done < len(data):
                done += os.pwrite(self.fd, memoryview(data)[done:], offset + done)
        except OSError as exc:
            raise StorageError(f"{self.path}: write at {offset}: {exc.strerror}") from exc

    def advise_willneed(self, blkno: int, count: int) -> None:
        """Start reading blocks into the cache in the background (best effort). The
        fadvise call itself blocks while it submits the I/O (about a tenth of a
        sequential read's time when made inline), so a helper thread makes it."""
        if self._advisor is None:
            self._advisor = _Advisor()
        self._advisor.queue.put((self.fd, blkno * BLOCK_SIZE, count * BLOCK_SIZE))

    def start_writeback(self, offset: int, length: int) -> None:
        """Start writing a range back to the disk now, without waiting for it (best
        effort; durability still comes only from flush()). A streaming writer then
        keeps the disk busy all along instead of leaving it all to the next flush."""
        if _sync_file_range is not None:
            _sync_file_range(self.fd, offset, length, SYNC_FILE_RANGE_WRITE)

    def flush(self) -> None:
        try:
            os.fsync(self.fd)
        except OSError as exc:
            raise StorageError(f"{self.path}: flush: {exc.strerror}") from exc

    def close(self) -> None:
        if self._advisor is not None:
            self._advisor.stop()
            self._advisor = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def statistics(self) -> dict[str, int]:
        return {"reads": self.reads, "writes": self.writes, "blocks": self.blocks}
