"""Fencing agents: make sure a removed node can no longer touch the shared disk.

The membership coordinator calls `await agent.fence(node_id, generation)` for every
node a quorate view removed, and only when every call returned does it announce
FENCE_DONE (membership publishes `Fenced`). An agent raises FenceError when it
could not fence; the coordinator logs it and tries again.

Agents here: NoopAgent (reports done at once; tests) and ProcessAgent (local dev
clusters: SIGKILLs the dead node's process from a pid map or pid files). SCSI-3
persistent reservations and a disk poison-pill slot come with the storage layer.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

import trio

from clusterfs.errors import ClusterFSError

log = logging.getLogger(__name__)


class FenceError(ClusterFSError):
    """A fencing agent could not confirm the node is fenced."""


class FenceAgent(Protocol):
    async def fence(self, node_id: int, generation: int) -> None:
        """Return once node_id certainly cannot write any more; raise FenceError if not."""


class NoopAgent:
    """Reports every node fenced at once, and remembers what it was asked."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

    async def fence(self, node_id: int, generation: int) -> None:
        self.calls.append((node_id, generation))
        log.info("gen %d: noop fence of node %d done", generation, node_id)
        await trio.lowlevel.checkpoint()

    def statistics(self) -> dict[str, object]:
        return {"agent": "noop", "fenced": len(self.calls)}


class ProcessAgent:
    """Kill -9 a dead node's process on this host (local dev clusters only).

    pids: node id -> pid; or pid_dir: a directory holding `node<ID>.pid` files.
    A node whose process is already gone counts as fenced.
    """

    def __init__(self, pids: Mapping[int, int] | None = None, *,
                 pid_dir: str | os.PathLike[str] | None = None, wait: float = 5.0) -> None:
        self.pids = dict(pids or {})
        self.pid_dir = Path(pid_dir) if pid_dir is not None else None
        self.wait = wait
        self.calls: list[tuple[int, int]] = []

    def pid_of(self, node_id: int) -> int | None:
        if node_id in self.pids:
            return self.pids[node_id]
        if self.pid_dir is not None:
            try:
                return int((self.pid_dir / f"node{node_id}.pid").read_text().strip())
            except FileNotFoundError:
                return None
            except (OSError, ValueError) as exc:
                raise FenceError(f"node {node_id}: bad pid file: {exc}") from exc
        return None

    async def fence(self, node_id: int, generation: int) -> None:
        self.calls.append((node_id, generation))
        pid = self.pid_of(node_id)
        if pid is None:
            log.info("gen %d: node %d has no known pid; counting it fenced", generation, node_id)
            return
        log.info("gen %d: fencing node %d: SIGKILL pid %d", generation, node_id, pid)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        except PermissionError as exc:
            raise FenceError(f"node {node_id}: cannot kill pid {pid}: {exc}") from exc
        with trio.move_on_after(self.wait):
            while _alive(pid):
                await trio.sleep(0.02)
            log.info("gen %d: node %d (pid %d) is gone", generation, node_id, pid)
            return
        raise FenceError(f"node {node_id}: pid {pid} still alive after SIGKILL")

    def statistics(self) -> dict[str, object]:
        return {"agent": "process", "fenced": len(self.calls)}


def _alive(pid: int) -> bool:
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)   # reap it if it is our child
        if done == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except OSError as exc:
        return exc.errno != errno.ESRCH
    try:   # a zombie we cannot reap is as good as dead
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][:1] != "Z"
    except (OSError, IndexError):
        return False
