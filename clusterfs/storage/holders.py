"""Who holds a device: a mount naming it, or another process holding it open (a FUSE
mount daemon opens the device itself, so it does not appear in /proc/mounts under the
device's name). fsck and mkfs refuse a device in use; umount waits for its holder to go.

Only names are compared (readlink of /proc/PID/fd/N), never stat: stat follows
the link into whatever filesystem the open file lives on, and a file open on a
FUSE mount whose server is stopped or busy would hang fsck there.
"""

from __future__ import annotations

import os

from clusterfs.storage.iscsi import is_iscsi_url

_DELETED = " (deleted)"


def users(path: str) -> list[str]:
    """Descriptions of mounts and other processes using `path` (empty if none). A URL
    (iscsi://) names no local file: who uses that LUN is not known here."""
    if is_iscsi_url(path) or not os.path.exists(path):
        return []
    found = _mounts(path, os.path.realpath(path))
    found += [f"pid {pid} ({_comm(str(pid))}) has it open" for pid in holder_pids(path)]
    return found


def holder_pids(path: str) -> list[int]:
    """Processes other than this one with `path` open."""
    if is_iscsi_url(path) or not os.path.exists(path):
        return []
    real = os.path.realpath(path)
    return [int(pid) for pid in _other_pids() if real in _open_files(pid)]


def mount_users(mountpoint: str) -> list[str]:
    """Processes other than this one keeping a mount busy: a working or root directory
    or an open file under `mountpoint`. Names only (readlink of /proc), so a stopped or
    busy server of that mount cannot hang the caller. (Nor the mountpoint's real
    path: the parent's, and the last name as given, since realpath of the
    mountpoint itself asks the filesystem there: a cluster node without quorum
    never answered, and `clusterfs umount` hung in it.)"""
    head, tail = os.path.split(os.path.abspath(mountpoint))
    top = os.path.join(os.path.realpath(head), tail)
    found = []
    for pid in _other_pids():
        uses = [what for what in ("cwd", "root")
                if _under(_fd_target(f"/proc/{pid}/{what}"), top)]
        if any(_under(target, top) for target in _open_files(pid)):
            uses.append("open files")
        if uses:
            found.append(f"pid {pid} ({_comm(pid)}): {', '.join(uses)}")
    return found


def _other_pids() -> list[str]:
    """Every process's /proc name but this one's."""
    me = str(os.getpid())
    return [pid for pid in _listdir("/proc") if pid.isdigit() and pid != me]


def _open_files(pid: str) -> set[str]:
    """What a process's descriptors name (the names it opened, "(deleted)" taken off)."""
    targets = (_fd_target(f"/proc/{pid}/fd/{fd}") for fd in _listdir(f"/proc/{pid}/fd"))
    return {t for t in targets if t is not None}


def _under(path: str | None, top: str) -> bool:
    return path is not None and (path == top or path.startswith(top.rstrip("/") + "/"))


def _fd_target(link: str) -> str | None:
    try:
        target = os.readlink(link)
    except OSError:
        return None
    return target.removesuffix(_DELETED)


def _mounts(path: str, real: str) -> list[str]:
    out = []
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                source, target, *_ = line.split()
                if source in (path, real) or (
                    source.startswith("/dev/") and os.path.realpath(source) == real
                ):
                    out.append(f"mounted on {target}")
    except OSError:
        pass
    return out


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


def _comm(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"
