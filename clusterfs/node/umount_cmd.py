"""clusterfs umount: unmount, then wait until the mount daemon has finished.

`fusermount3 -u` returns as soon as the kernel has detached the mount; the daemon then
still commits its journal, marks it clean and closes the device. A mount or fsck of the
same device started in that window is refused ("already mounted") or sees a journal not
yet clean. This command returns only once the daemon is gone (the one the mount record
names; without a record, every process that held the device), as `umount` does for a
kernel filesystem.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time

from clusterfs.errors import ClusterFSError
from clusterfs.node import mountrecord
from clusterfs.storage import holders

FSTYPE = "fuse.clusterfs"
PROGRESS_AFTER = 2.0     # seconds of waiting before we say what we wait for
# A mount busy with no process using it (no cwd, root or open file under it) is
# waiting for a last close the kernel has not finished sending: tried again this long
BUSY_RETRY = 3.0


class UmountError(ClusterFSError):
    pass


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--timeout", type=float, default=120.0,
                        help="seconds to wait for the mount daemon to finish (default 120)")
    parser.add_argument("mountpoint")


def run(args: argparse.Namespace) -> int:
    try:
        device = mounted_device(args.mountpoint)
        daemons = holders.holder_pids(device)
        # the nodes of a cluster on this host share the device: wait for ours only
        own = mountrecord.read(args.mountpoint)
        if own is not None and (own in daemons or _is_clusterfs(own)):
            daemons = [own]      # (an iscsi:// device has no local holders to find)
        _fusermount(args.mountpoint)
        _wait_for_exit(daemons, args.timeout)
    except UmountError as exc:
        print(f"clusterfs umount: {exc}", file=sys.stderr)
        return 1
    return 0


def mounted_device(mountpoint: str) -> str:
    """The device a clusterfs mount at `mountpoint` serves (UmountError if none)."""
    target = mountrecord.resolve(mountpoint)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            dash = fields.index("-")
            if _unescape(fields[4]) == target and fields[dash + 1] == FSTYPE:
                return _unescape(fields[dash + 2])
    raise UmountError(f"{mountpoint}: not a clusterfs mount")


_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")


def _unescape(field: str) -> str:
    # mountinfo writes space, tab, newline and backslash as \\ooo octal escapes and
    # everything else (UTF-8 names too) as it is
    return _OCTAL_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


def _fusermount(mountpoint: str) -> None:
    deadline = time.monotonic() + BUSY_RETRY
    while True:
        r = subprocess.run(["fusermount3", "-u", mountpoint], capture_output=True,
                           text=True)
        if r.returncode == 0:
            return
        said = r.stderr.strip() or f"fusermount3 -u failed ({r.returncode})"
        users = holders.mount_users(mountpoint) if "busy" in said else []
        if users:          # say who, as a user would otherwise ask fuser -m
            said += f"; in use by {'; '.join(users)}"
        if users or "busy" not in said or time.monotonic() > deadline:
            raise UmountError(said)
        time.sleep(0.1)    # busy with nobody using it: a last close still on its way


def _wait_for_exit(pids: list[int], timeout: float) -> None:
    start = time.monotonic()
    said = False
    while alive := [pid for pid in pids if _running(pid)]:
        waited = time.monotonic() - start
        if waited > timeout:
            raise UmountError(f"unmounted, but the daemon (pid {alive[0]}) is still running "
                              f"after {timeout:.0f} s")
        if waited > PROGRESS_AFTER and not said:
            print(f"waiting for the mount daemon (pid {alive[0]}) to finish writing back",
                  file=sys.stderr)
            said = True
        time.sleep(0.05)


def _is_clusterfs(pid: int) -> bool:
    """The pid (from a mount record) still names a clusterfs process."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"clusterfs" in f.read()
    except OSError:
        return False


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"      # a zombie has closed everything it held
