"""Exceptions of our own. They become FUSEError(errno) only in clusterfs.fuse.

Each filesystem error carries the errno the FUSE edge should report, so the
adapter maps them with one `except ClusterFSError as e: raise FUSEError(e.errno)`.
"""

import errno as _errno


class ClusterFSError(Exception):
    """Base of every clusterfs error."""

    errno: int = _errno.EIO


# -- filesystem semantics (fs layer); the errno is the POSIX answer ----------
class FSError(ClusterFSError):
    def __init__(self, err: int, message: str = "") -> None:
        super().__init__(message or _errno.errorcode.get(err, str(err)))
        self.errno = err


# -- on-disk format ------------------------------------------------------------
class FormatError(ClusterFSError):
    """A structure on disk is not what it should be (bad magic, checksum, range)."""


class NotClusterFS(FormatError):
    """The device holds no clusterfs superblock."""


class ChecksumError(FormatError):
    def __init__(self, blkno: int, what: str) -> None:
        super().__init__(f"bad checksum in {what} block {blkno}")
        self.blkno = blkno


# -- I/O ------------------------------------------------------------------------
class StorageError(ClusterFSError):
    """The block device failed or is unreachable."""


class ReservationConflict(StorageError):
    """The target refused a command with RESERVATION CONFLICT. On a read or write this
    means another node removed our SCSI-3 PR registration: this node was fenced, and
    must withdraw (stop writing at once); see docs/recovery.md, "Fencing agents"."""


class Withdrawn(ClusterFSError):
    """The filesystem hit corruption or lost its right to write, and stopped writing."""


class JournalError(ClusterFSError):
    pass


# -- cluster --------------------------------------------------------------------
class ConfigError(ClusterFSError):
    """A cluster configuration file is invalid; the message names the field."""


class ListenError(ClusterFSError):
    """This node cannot listen on its configured address (taken, or not ours)."""


class WireError(ClusterFSError):
    """A frame failed to decode or authenticate."""


class PeerUnreachable(ClusterFSError):
    errno = _errno.ETIMEDOUT


class Expelled(ClusterFSError):
    """This node was removed from the cluster; it must restart clean."""


class StateError(ClusterFSError):
    """A node's durable membership state is missing, corrupt or cannot be written."""


class FenceError(ClusterFSError):
    """A fencing agent could not confirm that a removed node can no longer write."""


class LockError(ClusterFSError):
    pass


class WouldBlock(LockError):
    """A try-lock could not be granted at once."""

    errno = _errno.EAGAIN


class LockCancelled(LockError):
    errno = _errno.ECANCELED


class NativeError(ClusterFSError):
    pass


def first_in_group(group: BaseExceptionGroup, kind: type[BaseException]
                   ) -> BaseException | None:
    """The first exception of `kind` in a (nested) exception group: trio >= 0.25 wraps
    every error that leaves a nursery, once per nursery it crosses."""
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            found = first_in_group(exc, kind)
            if found is not None:
                return found
        elif isinstance(exc, kind):
            return exc
    return None
