"""A disk path that can be made to hang for real, for the hung-disk tests.

    python3 tests/hangable_disk.py IMAGE MOUNTPOINT [WRITE_LOG]

A FUSE filesystem, served by this process alone, with one file, MOUNTPOINT/disk.img:
every read, write and fsync of it is passed on to IMAGE (os.pread / os.pwrite /
os.fsync). A loop device over that file is a block device whose every I/O goes
through this process; SIGSTOP it and each of them waits, uninterruptibly (the loop
device's worker waits for the FUSE answer, and a process waiting for that bio is in
D state: a SIGKILL of it completes only once the I/O returns); SIGCONT it and they
all go on, in the order the kernel sent them. That is a disk that hangs and comes
back, on one path only: another loop device straight over IMAGE stays good.

Coherence of the two paths: the file is opened with direct_io (no page cache of the
FUSE file in between: every loop I/O reaches this process), and this process and a
loop device straight over IMAGE both do buffered I/O on IMAGE itself, so they meet
in one page cache, IMAGE's. (Both paths' users open their loop device O_DIRECT, so
neither loop device keeps a page cache of its own either.)

It must run in its own process: a process that serves a FUSE mount must never do
I/O on that mount (its own request would wait for itself). Prints "ready" once
mounted; an unmount (fusermount3 -u) ends it.

SIGUSR1 arms a hang in the middle of a write: the next write of more than one block
(file data, not a node's heartbeat) stops this process (SIGSTOP of itself) before it
is written. So the disk hangs with a write in hand, wherever the test's timing
falls; SIGCONT lets it land, and all the I/O queued behind it.

WRITE_LOG: a line for every read and write once it is done, "R WALL_TIME OFFSET
LENGTH" and "W WALL_TIME OFFSET LENGTH HEAD" (HEAD: the hex of its first 32 bytes, so
a test can tell which write landed when: a late one lands after SIGCONT), and
"H WALL_TIME OFFSET LENGTH HEAD" when the armed hang stops it.
"""

from __future__ import annotations

import errno
import os
import signal
import stat
import sys
import time

import pyfuse3
import trio

BLOCK = 4096
FILE_INODE = pyfuse3.ROOT_INODE + 1
NAME = b"disk.img"


class PassThrough(pyfuse3.Operations):
    """One file, `disk.img`, that is IMAGE."""

    def __init__(self, image: str, write_log: str | None = None) -> None:
        super().__init__()
        self.fd = os.open(image, os.O_RDWR | os.O_CLOEXEC)
        self.size = os.fstat(self.fd).st_size
        self.log = open(write_log, "a", buffering=1) if write_log else None  # noqa: SIM115
        self.armed = False            # SIGUSR1: hang at the next write of file data

    def _attr(self, inode: int) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = inode
        if inode == pyfuse3.ROOT_INODE:
            attr.st_mode = stat.S_IFDIR | 0o755
            attr.st_nlink = 2
        else:
            attr.st_mode = stat.S_IFREG | 0o600
            attr.st_nlink = 1
            attr.st_size = self.size
        return attr

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext | None = None
                      ) -> pyfuse3.EntryAttributes:
        if inode not in (pyfuse3.ROOT_INODE, FILE_INODE):
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(inode)

    async def lookup(self, parent: int, name: bytes, ctx: pyfuse3.RequestContext | None = None
                     ) -> pyfuse3.EntryAttributes:
        if parent != pyfuse3.ROOT_INODE or name != NAME:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(FILE_INODE)

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        if inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        if start_id == 0:
            pyfuse3.readdir_reply(token, NAME, self._attr(FILE_INODE), 1)

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext
                   ) -> pyfuse3.FileInfo:
        if inode != FILE_INODE:
            raise pyfuse3.FUSEError(errno.EISDIR)
        # direct_io: no page cache of this file in the kernel; every I/O comes here
        return pyfuse3.FileInfo(fh=FILE_INODE, direct_io=True, keep_cache=False)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        data = os.pread(self.fd, size, off)
        if self.log is not None:
            self.log.write(f"R {time.time():.6f} {off} {len(data)}\n")
        return data

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        if self.armed and len(buf) > BLOCK:
            self._hang_here(off, len(buf), buf[:32])
        n = os.pwrite(self.fd, buf, off)
        if self.log is not None:
            self.log.write(f"W {time.time():.6f} {off} {n} {buf[:32].hex()}\n")
        return n

    def _hang_here(self, off: int, length: int, head: bytes) -> None:
        """Stop this whole process with this write in hand, not yet written: the
        disk hangs in the middle of a write, and every I/O behind it waits too. It
        goes on (the write lands, then the rest) at SIGCONT."""
        self.armed = False
        if self.log is not None:
            self.log.write(f"H {time.time():.6f} {off} {length} {head.hex()}\n")
        os.kill(os.getpid(), signal.SIGSTOP)

    async def fsync(self, fh: int, datasync: bool) -> None:
        os.fsync(self.fd)

    async def flush(self, fh: int) -> None:
        pass

    async def release(self, fh: int) -> None:
        pass


def main() -> None:
    image, mountpoint = sys.argv[1:3]
    ops = PassThrough(image, sys.argv[3] if len(sys.argv) > 3 else None)
    signal.signal(signal.SIGUSR1, lambda *_: setattr(ops, "armed", True))
    pyfuse3.init(ops, mountpoint, set(pyfuse3.default_options) | {"fsname=hangable"})
    print("ready", flush=True)     # (never a stat of the mount here: we serve it)
    try:
        trio.run(pyfuse3.main)     # until unmounted (fusermount3 -u)
    finally:
        pyfuse3.close(unmount=False)


if __name__ == "__main__":
    main()
