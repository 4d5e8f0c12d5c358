"""FUSE connections: find a mount's, and abort it (/sys/fs/fuse/connections/N/abort).

A killed mount process can stay half-dead: its leader a zombie while one of its
threads is stuck in the kernel (an entry invalidation, `fuse_reverse_inval_entry`,
waiting for a directory lock that a request to the dead server itself holds). It
then never finishes dying, its /dev/fuse is never closed, and nothing proves it
gone, until its FUSE connection is aborted, as a dead host's kernel would take the
mount with it. The process fencing agent does that for the node it fences
(agent.py), the dev-cluster tools and the tests for the nodes they kill.

Everything here reads /proc/self/mountinfo and never looks at a mountpoint itself
(a stat of a dead mount hangs, and a mount's own server must never make a syscall
on its mount). Only loopback dev clusters on one host use it.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

MOUNTINFO = "/proc/self/mountinfo"
FUSECTL = "/sys/fs/fuse/connections"

# mountinfo writes space, tab, newline and backslash as \ooo octal escapes
_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")


@dataclass(frozen=True)
class FuseMount:
    """A FUSE mount as mountinfo shows it: its mount id (unique while it is mounted),
    its connection number (the minor of its anonymous device) and where it is."""
    mount_id: int
    conn: int
    mountpoint: str


def unescape(field: str) -> str:
    return _OCTAL_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


def fuse_mount_at(path: str, mountinfo: str = MOUNTINFO) -> FuseMount | None:
    """The FUSE mount on top at `path` (an absolute path, not resolved: resolving
    would stat a dead mount), or None."""
    found = None
    with open(mountinfo) as f:
        for line in f:
            fields = line.split()
            if unescape(fields[4]) != path:
                continue
            found = None       # the last mount at the path is on top
            if fields[fields.index("-") + 1].startswith("fuse"):
                major, minor = fields[2].split(":")
                if major == "0":
                    found = FuseMount(int(fields[0]), int(minor), path)
    return found


def fuse_connection(path: str) -> int | None:
    """The FUSE connection number of the mount at `path`, or None."""
    mount = fuse_mount_at(path)
    return mount.conn if mount is not None else None


def abort_fuse(path: str) -> bool:
    """Abort the FUSE connection of the mount at `path`; True if done."""
    conn = fuse_connection(path)
    return conn is not None and abort_fuse_connection(conn)


def abort_fuse_connection(conn: int) -> bool:
    """Write to /sys/fs/fuse/connections/<conn>/abort. If fusectl is not mounted there,
    a private instance in a temporary directory, not a change to the host's table."""
    with contextlib.suppress(OSError):
        if _write_abort(FUSECTL, conn):
            return True
    tmp = tempfile.mkdtemp(prefix="cfs-fusectl-")
    try:
        if subprocess.run(["mount", "-t", "fusectl", "fusectl", tmp],
                          capture_output=True).returncode != 0:
            return False
        try:
            return _write_abort(tmp, conn)
        except OSError:
            return False
        finally:
            subprocess.run(["umount", tmp], capture_output=True)
    finally:
        with contextlib.suppress(OSError):
            os.rmdir(tmp)


def _write_abort(root: str, conn: int) -> bool:
    path = os.path.join(root, str(conn), "abort")
    if not os.path.exists(path):
        return False
    with open(path, "w") as f:
        f.write("1")
    return True


__all__ = ["FuseMount", "abort_fuse", "abort_fuse_connection", "fuse_connection",
           "fuse_mount_at", "unescape"]
