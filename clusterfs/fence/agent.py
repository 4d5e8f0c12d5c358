"""Fencing agents: make sure a removed node can no longer touch the shared disk.

The membership coordinator calls `await agent.fence(node_id, generation, incarnation)`
for every node a quorate view removed (with the incarnation that view removed), and
only when every call returned does it announce FENCE_DONE (membership publishes
`Fenced`, and DLM recovery may go on). An agent raises FenceError when it could not
prove the node fenced; the coordinator logs it and tries again, so recovery waits
rather than proceed on an unproven fence.

Agents here: NoopAgent (reports done at once and proves nothing; tests) and
ProcessAgent (local dev clusters: SIGKILLs the removed incarnation's process, found
from a pid map or `node<ID>.pid` files, after checking that the pid still names
that process; a record of a later incarnation proves it gone, and nothing is
killed). The agents for real disks are in scsi_pr.py (SCSI-3 persistent
reservations) and poison_pill.py (a pill in the victim's heartbeat slot);
factory.make_agent builds the one the config's [fencing] table names.
"""

from __future__ import annotations

import logging
import os
import select
import signal
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

import trio

from clusterfs import workers
from clusterfs.errors import FenceError
from clusterfs.fence.fuseconn import abort_fuse_connection, fuse_mount_at
from clusterfs.fence.pidfile import (
    PidRecord,
    ProcessIdentity,
    identity_even_if_zombie,
    read_mount_record,
    read_pid_record,
    start_time,
)

__all__ = ["FenceAgent", "FenceError", "NoopAgent", "ProcessAgent"]   # FenceError: compat

log = logging.getLogger(__name__)


class FenceAgent(Protocol):
    async def fence(self, node_id: int, generation: int,
                    incarnation: int | None = None) -> None:
        """Return once node_id (its `incarnation`, if given) certainly cannot write any
        more; raise FenceError if not."""


class NoopAgent:
    """Reports every node fenced at once, and remembers what it was asked."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

    async def fence(self, node_id: int, generation: int,
                    incarnation: int | None = None) -> None:
        self.calls.append((node_id, generation))
        # Said every time: a run that relies on this agent has no fencing at all.
        log.warning("gen %d: node %d counted fenced by the noop agent, which proves nothing "
                    "(lockd: give --fence-pid-dir for real fencing of local processes)",
                    generation, node_id)
        await trio.lowlevel.checkpoint()

    def statistics(self) -> dict[str, object]:
        return {"agent": "noop", "fenced": len(self.calls)}


class ProcessAgent:
    """Kill -9 a dead node's process on this host (local dev clusters only).

    pids: node id -> pid of a process alive now (its start time is taken here);
    or pid_dir: a directory of `node<ID>.pid` files (clusterfs.fence.pidfile), which
    lockd writes at start. A node with neither is a failure (FenceError): nothing
    proves it gone. A recorded process that no longer exists (or whose pid now
    names another process) is already dead: fenced, and nothing is killed.

    The incarnation decides which process is meant: a record of another incarnation
    than the one to fence was written by a restart of the node, which replaces a
    record only once its process is gone (pidfile.write_pid_file); so the removed
    incarnation is gone, it is fenced, and the restarted process is left alone.
    (Killing it, as a fence by node id did, threw a freshly restarted node out again.)

    A killed mount process that is still there `abort_after` seconds after the
    SIGKILL is taken for half-dead (a thread stuck in the kernel in its own FUSE
    mount, fuseconn.py): the agent aborts the FUSE connection of that node's own
    mount, as its mount record names it (pidfile.py), and waits again. A process is
    gone only once its whole thread group has exited (its pidfd turns readable), a
    zombie leader with a live thread is not.
    """

    def __init__(self, pids: Mapping[int, int] | None = None, *,
                 pid_dir: str | os.PathLike[str] | None = None, wait: float = 5.0,
                 abort_after: float = 1.0) -> None:
        # A pid given now names a process alive now; its start time pins that process.
        self.known = {nid: ProcessIdentity(pid, start_time(pid) or -1)
                      for nid, pid in (pids or {}).items()}
        self.pid_dir = Path(pid_dir) if pid_dir is not None else None
        self.wait = wait
        self.abort_after = min(abort_after, wait)
        self.calls: list[tuple[int, int]] = []
        self.aborted: list[tuple[int, int]] = []   # (node, FUSE connection) we aborted
        # node -> its record and a pidfd of its process, taken while it joined (expect)
        self._held: dict[int, tuple[PidRecord, int | None]] = {}
        self._expected: dict[int, int] = {}    # node -> the incarnation last expected

    def expect(self, node_id: int, incarnation: int) -> None:
        """node_id is in our view as `incarnation`: read its record and hold its
        process (a pidfd) now, so that fencing that incarnation later opens no file
        (clusterfs.failover). Once per incarnation, and best effort: without it,
        fence() reads the record then."""
        if self._expected.get(node_id) == incarnation:
            return
        self._expected[node_id] = incarnation
        try:
            record = self.record_of_node(node_id)
        except FenceError as exc:
            log.debug("node %d: no pid record to hold yet: %s", node_id, exc)
            return
        if record.incarnation != incarnation:
            return                   # not written yet, or a newer life: read at fence
        self._release(node_id)
        self._held[node_id] = (record, _open_if_same(record.process))

    def _release(self, node_id: int) -> None:
        held = self._held.pop(node_id, None)
        if held is not None and held[1] is not None:
            os.close(held[1])

    def close(self) -> None:
        for node_id in list(self._held):
            self._release(node_id)

    def record_of_node(self, node_id: int) -> PidRecord:
        if node_id in self.known:
            return PidRecord(self.known[node_id], None)
        if self.pid_dir is None:
            raise FenceError(f"node {node_id}: no pid known: cannot prove it is gone")
        return read_pid_record(self.pid_dir, node_id)

    async def fence(self, node_id: int, generation: int,
                    incarnation: int | None = None) -> None:
        self.calls.append((node_id, generation))
        held = self._held.get(node_id)
        if held is not None and incarnation is not None and held[0].incarnation == incarnation:
            await self._fence_held(node_id, generation, held[0].process, held[1])
            self._release(node_id)
            return
        record = self.record_of_node(node_id)
        if (incarnation is not None and record.incarnation is not None
                and record.incarnation != incarnation):
            log.info("gen %d: node %d fenced: incarnation %#x is gone, the node was "
                     "restarted since as incarnation %#x (pid %d), which is not killed",
                     generation, node_id, incarnation, record.incarnation,
                     record.process.pid)
            return
        recorded = record.process
        pidfd = _open_if_same(recorded)
        if pidfd is None:
            log.info("gen %d: node %d fenced: its process (pid %d, start %d) is already gone",
                     generation, node_id, recorded.pid, recorded.start_time)
            return
        try:
            log.warning("gen %d: fencing node %d: SIGKILL pid %d", generation, node_id,
                        recorded.pid)
            _kill(pidfd, node_id, recorded.pid)
            await self._wait_gone(pidfd, node_id, recorded, generation)
        finally:
            os.close(pidfd)
        log.warning("gen %d: node %d fenced: pid %d killed and gone", generation, node_id,
                    recorded.pid)

    async def _fence_held(self, node_id: int, generation: int, process: ProcessIdentity,
                          pidfd: int | None) -> None:
        """Fence the process held since it joined: its pidfd names that very process
        (None: it was gone already then)."""
        if pidfd is None:
            log.info("gen %d: node %d fenced: its process (pid %d) was gone already",
                     generation, node_id, process.pid)
            return
        killed = _kill(pidfd, node_id, process.pid)
        await self._wait_gone(pidfd, node_id, process, generation)
        log.warning("gen %d: node %d fenced: pid %d %s", generation, node_id, process.pid,
                    "killed (SIGKILL) and gone" if killed else "was gone already")

    async def _wait_gone(self, pidfd: int, node_id: int, process: ProcessIdentity,
                         generation: int) -> None:
        """Return once the killed process is gone; abort its mount's FUSE connection
        if it lingers (half-dead); FenceError if it is still there after `wait`."""
        if await _exits_within(pidfd, self.abort_after):
            return
        await workers.run(self._abort_own_mount, node_id, process, generation)
        if await _exits_within(pidfd, self.wait - self.abort_after):
            return
        raise FenceError(f"node {node_id}: pid {process.pid} still alive {self.wait} s "
                         "after SIGKILL")

    def _abort_own_mount(self, node_id: int, process: ProcessIdentity,
                         generation: int) -> bool:
        """Abort the FUSE connection of the mount that `process`, node_id's, recorded
        as its own, if mountinfo still shows that very mount (same mount id,
        connection and mountpoint): never another's. True if aborted. (A worker
        thread: it reads the record and mountinfo and writes the abort file.)"""
        if self.pid_dir is None:
            return False
        try:
            record = read_mount_record(self.pid_dir, node_id)
        except FenceError as exc:
            log.warning("gen %d: node %d: pid %d lingers after SIGKILL, and it has no "
                        "FUSE mount to abort: %s", generation, node_id, process.pid, exc)
            return False
        if record.process != process:
            log.warning("gen %d: node %d: pid %d lingers after SIGKILL; its mount record "
                        "names pid %d, not it: nothing aborted", generation, node_id,
                        process.pid, record.process.pid)
            return False
        mounted = fuse_mount_at(record.mount.mountpoint)
        if mounted != record.mount:
            log.warning("gen %d: node %d: pid %d lingers after SIGKILL; its FUSE mount on "
                        "%s (connection %d) is not there any more: nothing aborted",
                        generation, node_id, process.pid, record.mount.mountpoint,
                        record.mount.conn)
            return False
        log.warning("gen %d: node %d: pid %d still there %.1f s after SIGKILL (half-dead: a "
                    "thread stuck in its own FUSE mount?); aborting that mount's FUSE "
                    "connection %d on %s", generation, node_id, process.pid,
                    self.abort_after, mounted.conn, mounted.mountpoint)
        if not abort_fuse_connection(mounted.conn):
            log.warning("gen %d: node %d: could not abort FUSE connection %d", generation,
                        node_id, mounted.conn)
            return False
        self.aborted.append((node_id, mounted.conn))
        return True

    def statistics(self) -> dict[str, object]:
        return {"agent": "process", "fenced": len(self.calls)}


def _open_if_same(recorded: ProcessIdentity) -> int | None:
    """A pidfd of the recorded process if it still lives, else None.

    The pidfd is opened before the identity check: if the pid was reused between
    the two, the live process's start time differs and we answer None; if it
    matches, the pidfd holds that very process and a later reuse cannot redirect
    the kill to another one.
    """
    try:
        pidfd = os.pidfd_open(recorded.pid)
    except ProcessLookupError:
        return None
    if identity_even_if_zombie(recorded.pid) != recorded or _exited(pidfd):
        os.close(pidfd)
        return None
    return pidfd


def _exited(pidfd: int) -> bool:
    """The pidfd's whole thread group has exited (a zombie leader with a live thread
    has not)."""
    readable, _, _ = select.select([pidfd], [], [], 0)
    return bool(readable)


async def _exits_within(pidfd: int, seconds: float) -> bool:
    # A pidfd turns readable when its process has exited (zombie or reaped), every
    # thread of it.
    with trio.move_on_after(seconds):
        await trio.lowlevel.wait_readable(pidfd)
        return True
    return False


def _kill(pidfd: int, node_id: int, pid: int) -> bool:
    """SIGKILL through the pidfd; False if the process had exited already."""
    try:
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    except ProcessLookupError:
        return False                  # exited meanwhile: the wait sees it at once
    except PermissionError as exc:
        raise FenceError(f"node {node_id}: cannot kill pid {pid}: {exc}") from exc
    return True
