"""Pid files for the process fencing agent:
`DIR/node<ID>.pid` = "<pid> <start time> <incarnation, hex>".

A pid alone does not name a process: after the process dies the kernel may hand
the number to any other one. The start time (field 22 of /proc/PID/stat, in clock
ticks since boot) does not repeat for one pid, so the pair identifies a process
for as long as the host runs.

The incarnation is the membership incarnation the process joins with, so the
fencing agent can tell whether the record still belongs to the incarnation a
view removed. A record is replaced only by a process that has checked the
recorded one is no longer alive (`write_pid_file` refuses otherwise), so a
record of another incarnation proves every earlier recorded process gone.
Records of two fields (written before incarnations were recorded) are still read;
their incarnation is unknown.

The file is written atomically (a temporary file renamed over it), so the agent
never reads a half-written record.

`DIR/node<ID>.mount` (JSON) is the same process's FUSE mount, written by the mount
once it is up: its mount id, connection number and mountpoint as the process found
them in its own /proc/self/mountinfo. The agent aborts that connection when the
process it killed does not go away (a thread stuck in its own mount, fuseconn.py),
and only if the record names that very process and mountinfo still shows that very
mount.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from clusterfs.errors import FenceError
from clusterfs.fence.fuseconn import FuseMount

# /proc/PID/stat after the ") " that ends the command name starts at field 3
_STARTTIME_FIELD = 22 - 3


@dataclass(frozen=True)
class ProcessIdentity:
    pid: int
    start_time: int


@dataclass(frozen=True)
class PidRecord:
    process: ProcessIdentity
    incarnation: int | None       # None: an old record that did not say


@dataclass(frozen=True)
class MountRecord:
    process: ProcessIdentity
    incarnation: int
    mount: FuseMount


def pid_file_path(pid_dir: str | os.PathLike[str], node_id: int) -> Path:
    return Path(pid_dir) / f"node{node_id}.pid"


def mount_record_path(pid_dir: str | os.PathLike[str], node_id: int) -> Path:
    return Path(pid_dir) / f"node{node_id}.mount"


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat from field 3 on, or None if there is no such pid."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # the command name (field 2) may itself hold spaces and parentheses
    return text.rsplit(") ", 1)[1].split()


def start_time(pid: int) -> int | None:
    """The start time of the live process `pid`, or None if it is gone (or a zombie)."""
    fields = _stat_fields(pid)
    if fields is None or fields[0] in "ZX":   # a zombie (or dead) task cannot write
        return None
    return int(fields[_STARTTIME_FIELD])


def identity_of(pid: int) -> ProcessIdentity | None:
    started = start_time(pid)
    return None if started is None else ProcessIdentity(pid, started)


def identity_even_if_zombie(pid: int) -> ProcessIdentity | None:
    """The identity of pid while its task exists, a zombie's too: a killed process
    whose leader is a zombie may still have a thread that has not exited (stuck in
    the kernel), and is not gone until that one is."""
    fields = _stat_fields(pid)
    if fields is None or fields[0] == "X":
        return None
    return ProcessIdentity(pid, int(fields[_STARTTIME_FIELD]))


def write_pid_file(pid_dir: str | os.PathLike[str], node_id: int,
                   incarnation: int | None = None) -> ProcessIdentity:
    """Record this process (joining as `incarnation`) as node_id's in pid_dir
    (created if missing).

    FenceError if the record names another live process: overwriting it would
    leave that process unfenceable (its record gone) while it may still write.
    """
    me = identity_of(os.getpid())
    assert me is not None, "our own process is alive"
    path = pid_file_path(pid_dir, node_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    _refuse_if_running(pid_dir, node_id, me)
    tmp = path.with_name(f".{path.name}.{me.pid}.tmp")
    inc = "" if incarnation is None else f" {incarnation:x}"
    tmp.write_text(f"{me.pid} {me.start_time}{inc}\n")
    os.replace(tmp, path)
    return me


def _refuse_if_running(pid_dir: str | os.PathLike[str], node_id: int,
                       me: ProcessIdentity) -> None:
    try:
        current = read_pid_file(pid_dir, node_id)
    except FenceError:
        return                        # no (readable) record: nothing to protect
    if current != me and identity_of(current.pid) == current:
        raise FenceError(f"node {node_id} already runs as pid {current.pid} "
                         f"({pid_file_path(pid_dir, node_id)})")


def write_mount_record(pid_dir: str | os.PathLike[str], node_id: int, incarnation: int,
                       mount: FuseMount) -> None:
    """Record this process's FUSE mount beside its pid record (atomically)."""
    me = identity_of(os.getpid())
    assert me is not None, "our own process is alive"
    path = mount_record_path(pid_dir, node_id)
    tmp = path.with_name(f".{path.name}.{me.pid}.tmp")
    tmp.write_text(json.dumps({
        "pid": me.pid, "start_time": me.start_time, "incarnation": incarnation,
        "mount_id": mount.mount_id, "conn": mount.conn, "mountpoint": mount.mountpoint}))
    os.replace(tmp, path)


def read_mount_record(pid_dir: str | os.PathLike[str], node_id: int) -> MountRecord:
    """node_id's mount record; FenceError if there is none or it is unreadable."""
    path = mount_record_path(pid_dir, node_id)
    try:
        r = json.loads(path.read_text())
        return MountRecord(ProcessIdentity(int(r["pid"]), int(r["start_time"])),
                           int(r["incarnation"]),
                           FuseMount(int(r["mount_id"]), int(r["conn"]), str(r["mountpoint"])))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise FenceError(f"node {node_id}: no usable mount record {path}: {exc}") from exc


def read_pid_file(pid_dir: str | os.PathLike[str], node_id: int) -> ProcessIdentity:
    """The identity recorded for node_id; FenceError if there is none or it is unreadable."""
    return read_pid_record(pid_dir, node_id).process


def read_pid_record(pid_dir: str | os.PathLike[str], node_id: int) -> PidRecord:
    """The record of node_id; FenceError if there is none or it is unreadable."""
    path = pid_file_path(pid_dir, node_id)
    try:
        fields = path.read_text().split()
        if len(fields) not in (2, 3):
            raise ValueError(f"{len(fields)} fields")
        inc = int(fields[2], 16) if len(fields) == 3 else None
        return PidRecord(ProcessIdentity(int(fields[0]), int(fields[1])), inc)
    except FileNotFoundError as exc:
        raise FenceError(f"node {node_id}: no pid file {path}: cannot prove it is gone") from exc
    except (OSError, ValueError) as exc:
        raise FenceError(f"node {node_id}: bad pid file {path}: {exc}") from exc

