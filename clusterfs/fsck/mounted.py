"""Is the device in use? Checked from /proc: a mount naming it, or another
process holding it open (a FUSE mount daemon opens the device itself, so it
does not appear in /proc/mounts under the device's name)."""

from __future__ import annotations

import os
import stat


def _identity(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    if stat.S_ISBLK(st.st_mode):
        return (-1, st.st_rdev)
    return (st.st_dev, st.st_ino)


def users(path: str) -> list[str]:
    """Descriptions of mounts and other processes using `path` (empty if none)."""
    want = _identity(path)
    if want is None:
        return []
    found = _mounts(path)
    me = os.getpid()
    for pid in filter(str.isdigit, _listdir("/proc")):
        if int(pid) == me:
            continue
        for fd in _listdir(f"/proc/{pid}/fd"):
            if _identity(f"/proc/{pid}/fd/{fd}") == want:
                found.append(f"pid {pid} ({_comm(pid)}) has it open")
                break
    return found


def _mounts(path: str) -> list[str]:
    real = os.path.realpath(path)
    out = []
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                source, target, *_ = line.split()
                if source.startswith("/") and os.path.realpath(source) == real:
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
