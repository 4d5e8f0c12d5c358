"""Which process serves which mountpoint: /run/clusterfs/mounts/<hash>.pid.

The nodes of a cluster on one host all hold the same device, so `clusterfs umount`
cannot tell the daemon of one mountpoint from the others by the device. Each mount
daemon leaves a record naming its mountpoint and pid, and removes it when it exits.
"""

from __future__ import annotations

import contextlib
import hashlib
import os

RECORD_DIR = "/run/clusterfs/mounts"


def _path(real_mountpoint: str) -> str:
    key = hashlib.sha1(real_mountpoint.encode()).hexdigest()[:20]
    return os.path.join(RECORD_DIR, f"{key}.pid")


def write(real_mountpoint: str) -> None:
    """Record this process as the daemon of `real_mountpoint`, which must be resolved
    already: the daemon may not look at its own live mountpoint (that request would
    wait for the daemon itself). Best effort."""
    try:
        os.makedirs(RECORD_DIR, exist_ok=True)
        with open(_path(real_mountpoint), "w") as f:
            f.write(f"{os.getpid()} {real_mountpoint}\n")
    except OSError:
        pass       # umount then waits for every holder of the device, as before


def remove(real_mountpoint: str) -> None:
    with contextlib.suppress(OSError):
        if _recorded(real_mountpoint) == os.getpid():
            os.unlink(_path(real_mountpoint))


def resolve(mountpoint: str) -> str:
    """The mountpoint's real path, without looking at the mountpoint itself: that
    would ask the filesystem mounted there, which may not answer (a cluster node
    without quorum makes every call wait)."""
    head, tail = os.path.split(os.path.abspath(mountpoint))
    return os.path.join(os.path.realpath(head), tail)


def read(mountpoint: str) -> int | None:
    """The pid recorded for `mountpoint`, or None."""
    return _recorded(resolve(mountpoint))


def _recorded(real_mountpoint: str) -> int | None:
    try:
        with open(_path(real_mountpoint)) as f:
            pid, _, where = f.read().strip().partition(" ")
    except OSError:
        return None
    return int(pid) if where == real_mountpoint and pid.isdigit() else None
