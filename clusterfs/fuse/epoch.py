"""KernelEpoch: make the kernel drop every name it caches, at once and taking no lock.

In a cluster a name may be cached by the kernel only as long as the lock of its
directory stays here: another node may change the directory once that lock goes. The
per-name invalidation (FUSE_NOTIFY_INVAL_ENTRY, also its expire-only variant) takes
the directory's inode lock, which a request pending in that directory holds while it
waits for the very glock being demoted, so a demote cannot wait for it
(docs/locking.md, "Kernel caches in a cluster"). Linux 6.16 added
FUSE_NOTIFY_INC_EPOCH: the connection's epoch goes up by one, taking no lock at all,
and every dentry stamped with an older epoch is invalid at its next use (the kernel
asks again, fs/fuse/dir.c: fuse_dentry_revalidate). A LOOKUP stamps its dentry with
the epoch read *before* the request is sent, so a bump that comes after our answer
(or while it travels) always invalidates it: a demote that bumps before its lock goes
leaves nothing cached that the lock no longer covers.

(A READDIRPLUS entry is stamped with the epoch read when the kernel links it, after
our reply: a bump between our reply and the link would be missed, so readdirplus
entries are never given a positive entry timeout.)

libfuse 3.14 has no call for this notification (3.18 adds
fuse_lowlevel_notify_increment_epoch), and pyfuse3 does not give out the session's
file descriptor, so the notification is written to the process's /dev/fuse descriptor
directly: a 16-byte fuse_out_header with unique 0 (a notification) and the code in
the error field, no body. One write is one message, so this does not mix with
libfuse's own writes to that descriptor. Kernels before 6.16 refuse the code
(EINVAL): `available` stays False and the mount caches no names, as before.
"""

from __future__ import annotations

import errno
import logging
import os
import struct

log = logging.getLogger(__name__)

FUSE_NOTIFY_INC_EPOCH = 8
# struct fuse_out_header { uint32 len; int32 error (the notify code); uint64 unique (0) }
_INC_EPOCH = struct.pack("<IiQ", 16, FUSE_NOTIFY_INC_EPOCH, 0)


def find_fuse_fd(fd_dir: str = "/proc/self/fd") -> int | None:
    """The process's one /dev/fuse descriptor (pyfuse3 serves one session per process),
    or None when there is none or more than one (then we cannot tell which it is)."""
    found = []
    try:
        names = os.listdir(fd_dir)
    except OSError:
        return None
    for name in names:
        try:
            if os.readlink(os.path.join(fd_dir, name)) == "/dev/fuse":
                found.append(int(name))
        except (OSError, ValueError):
            continue                     # closed meanwhile (the listing's own fd)
    return found[0] if len(found) == 1 else None


class KernelEpoch:
    def __init__(self) -> None:
        self._fd: int | None = None
        self.available = False
        self.bumps = 0

    def start(self, fd: int | None = None) -> bool:
        """Find the session's descriptor and check that the kernel takes the
        notification (a first bump, which invalidates nothing yet). True if it does."""
        self._fd = find_fuse_fd() if fd is None else fd
        if self._fd is None:
            log.info("kernel name cache: no single /dev/fuse descriptor; names uncached")
            return False
        self.available = self._write()
        log.info("kernel name cache: %s", "on (FUSE_NOTIFY_INC_EPOCH)" if self.available
                 else "off (the kernel has no FUSE_NOTIFY_INC_EPOCH, Linux < 6.16)")
        return self.available

    def bump(self) -> None:
        """Every name the kernel caches is invalid from now on. If that ever fails, no
        name is handed out for caching any more (and the caller's names are only as
        stale as their 1 s timeout allows: log it loudly)."""
        if self.available and not self._write():
            self.available = False
            log.error("kernel name cache: the epoch could not be raised; names uncached "
                      "from now on (those cached expire within their timeout)")

    def stop(self) -> None:
        """Before the FUSE session closes its descriptor."""
        self.available = False
        self._fd = None

    def _write(self) -> bool:
        if self._fd is None:
            return False
        try:
            os.write(self._fd, _INC_EPOCH)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                log.warning("FUSE_NOTIFY_INC_EPOCH: %s", exc)
            return False
        self.bumps += 1
        return True
