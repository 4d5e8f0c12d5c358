"""Fencing in a cluster with a storage group of block servers (proxy I/O).

The fencing agents of clusterfs.fence cut a node off the disk itself: the process
agent kills it, the poison pill makes it stop, SCSI-3 PREEMPT removes its key so the
target refuses its session. A node without a path to the disk writes through the
block servers' sessions instead: it has no I_T nexus and no key of its own, and a
PREEMPT cannot touch it - its writes travel under the *servers'* registrations. So
such a node is fenced where its writes go:

- a removed node **without** a path: the configured agent runs first (the process
  agent kills it; scsi-pr has nothing to preempt and is skipped), then every live
  server (the storage group's members of the fencer's view, this node's own server
  in-process) is told to cut it off (BLOCK_FENCE): it refuses that node's writes
  from every generation before the view that removed it, and answers once none of
  them is in flight. Only when every live server answered is the node fenced.
  Servers that are not live were removed themselves, and are fenced in the same
  view (a PREEMPT of their key also voids what they still had queued);
- a removed node **with** a path: the configured agent, as without a storage group.
  A fencer that has no path of its own cannot log in to the LUN to PREEMPT; it asks a
  live server to preempt on its behalf (BLOCK_FENCE with `preempt`), which does so
  with its own node's agent.

`StorageGroupFence` is that agent; node/fencing.py builds it around the configured
one whenever the config has block servers, and binds the node's view and own
server (`attach`) once the node has joined. Everything it uses is imported with
this module: nothing is imported or opened from a file on the failover path.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from clusterfs import workers
from clusterfs.config import ClusterConfig
from clusterfs.errors import ClusterFSError, FenceError, WireError
from clusterfs.fence.agent import FenceAgent
from clusterfs.storage.blockserver import BlockServer
from clusterfs.storage.proxy import _Connection, _Silent
from clusterfs.wire.types import MsgType

log = logging.getLogger(__name__)

FENCE_TIMEOUT = 5.0        # seconds a server may take to cut a node off (drain, preempt)

View = tuple[int, frozenset[int]]          # (generation, members)


class StorageGroupFence:
    """A FenceAgent for clusters with block servers (see the module doc). `inner`: the
    configured agent, None on a node that has no path in a scsi-pr cluster; `kind`:
    its name in the config ("scsi-pr", "process", ...)."""

    def __init__(self, cfg: ClusterConfig, node_id: int, inner: FenceAgent | None,
                 kind: str) -> None:
        self.cfg = cfg
        self.node_id = node_id
        self.inner = inner
        self.kind = kind
        self.server: BlockServer | None = None
        self._view: Callable[[], View] | None = None
        self.cut_offs: list[tuple[int, int]] = []       # (node, generation)
        self.delegated: list[tuple[int, int]] = []      # preempts a server did for us

    def attach(self, view: Callable[[], View], server: BlockServer | None) -> None:
        """The node's current view, and its own block server (None on a proxy)."""
        self._view = view
        self.server = server

    async def fence(self, node_id: int, generation: int,
                    incarnation: int | None = None) -> None:
        if self.cfg.reaches_disk(node_id):
            await self._fence_disk_node(node_id, generation, incarnation)
            return
        if self.inner is not None and self.kind != "scsi-pr":
            await self.inner.fence(node_id, generation, incarnation)
        await self._cut_off_at_servers(node_id, generation)

    def _live_servers(self, victim: int) -> list[int]:
        if self._view is None:
            raise FenceError(f"node {victim}: not in the cluster yet, cannot fence")
        members = self._view()[1]
        return sorted(s for s in self.cfg.storage_group if s in members and s != victim)

    async def _fence_disk_node(self, victim: int, generation: int,
                               incarnation: int | None) -> None:
        if self.inner is not None:
            await self.inner.fence(victim, generation, incarnation)
            return
        errors = []
        for server in self._live_servers(victim):
            try:
                await self._ask(server, victim, generation, preempt=True)
            except FenceError as exc:
                errors.append(str(exc))
                continue
            self.delegated.append((victim, generation))
            log.warning("gen %d: node %d fenced on the disk by block server %d for us",
                        generation, victim, server)
            return
        raise FenceError(f"node {victim}: no live block server could fence it on the disk "
                         f"({'; '.join(errors) or 'none live'})")

    async def _cut_off_at_servers(self, victim: int, generation: int) -> None:
        servers = self._live_servers(victim)
        for server in servers:
            if server == self.node_id:
                await self._cut_off_here(victim, generation)
            else:
                await self._ask(server, victim, generation, preempt=False)
        self.cut_offs.append((victim, generation))
        log.warning("gen %d: node %d fenced: cut off at block server(s) %s (it has no path "
                    "of its own)", generation, victim, servers)

    async def _cut_off_here(self, victim: int, generation: int) -> None:
        if self.server is None:
            raise FenceError(f"node {victim}: this node's block server is not running")
        try:
            await self.server.cut_off_node(victim, generation)
        except ClusterFSError as exc:
            raise FenceError(f"node {victim}: {exc}") from exc

    async def _ask(self, server: int, victim: int, generation: int, *,
                   preempt: bool) -> None:
        """BLOCK_FENCE to `server` (blocking socket, in a worker thread)."""
        assert self._view is not None
        ours = self._view()[0]
        body = {"id": 1, "node": victim, "gen": generation, "preempt": preempt}

        def call() -> dict[str, Any]:
            conn = _Connection(self.cfg, self.node_id, server, FENCE_TIMEOUT)
            try:
                return conn.request(MsgType.BLOCK_FENCE, ours, body, FENCE_TIMEOUT)
            finally:
                conn.close()

        try:
            reply = await workers.run(call)
        except (_Silent, OSError, WireError) as exc:
            raise FenceError(f"node {victim}: block server {server}: {exc}") from exc
        if not reply.get("ok"):
            raise FenceError(f"node {victim}: block server {server} refused to fence it: "
                             f"{reply.get('error')}")

    def statistics(self) -> dict[str, Any]:
        inner = self.inner
        return {"agent": f"{self.kind} + storage group",
                "cut_off": [list(c) for c in self.cut_offs],
                "fenced_by_a_server": [list(d) for d in self.delegated],
                "inner": inner.statistics() if hasattr(inner, "statistics") else None}

    def close(self) -> None:
        if hasattr(self.inner, "close"):
            self.inner.close()
