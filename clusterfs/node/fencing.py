"""How a cluster mount takes part in fencing (docs/recovery.md, "Fencing agents").

Both sides of it live in the mount process, which is the node:

- as a possible victim: with `scsi-pr` the session the mount writes through
  registers this node's key before the first write, and a RESERVATION CONFLICT on
  it means this node was fenced; with `poison-pill` the node claims the heartbeat
  slot of its journal slot right after claiming the journal (before any replay)
  and runs a PillWatcher, which also guards every write (it reads the slot again
  before a write when its last read is stale). Either way `stop_writing` makes
  every device refuse writes at once and withdraws the filesystem;
- as a survivor: the agent the config names (or the process agent of a dev
  cluster's --fence-pid-dir) goes to membership, whose coordinator fences a
  removed node through it before any recovery. With block servers in the config
  it is wrapped in a StorageGroupFence (clusterfs/storage/groupfence.py): a node
  without a path is also cut off at every live server, and a fencer without a path
  has a server preempt for it.

`MountFencing` holds that state; node/mount_cmd.py calls it at fixed points:
`prepare_device` (before joining), `agent()` (for open_cluster_node),
`attach_storage` (once joined: the view, and the node's block server if any),
`claim_slot` (from claim_journal), `attach(fs)` once the filesystem exists.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import trio

from clusterfs.errors import ClusterFSError, FenceError
from clusterfs.fence.agent import FenceAgent, ProcessAgent
from clusterfs.membership.view import ViewChange

log = logging.getLogger("clusterfs.mount")


class MountFencing:
    """One mount's fencing: its agent, its registration or pill slot, its withdraw.

    `dev` is the mount's device; `open_device(path, role)` opens another handle on
    the shared disk (role names it: "fence" for the agent's iSCSI sessions, "watch"
    for the pill watcher's own handle)."""

    def __init__(self, cfg: Any, node_id: int, incarnation: int, dev: Any, sb: Any,
                 path: str, open_device: Callable[[str, str], Any],
                 pid_dir: str | None = None) -> None:
        self.cfg = cfg
        self.node_id = node_id
        self.incarnation = incarnation
        self.dev = dev
        self.sb = sb
        self.path = path
        self.open_device = open_device
        self.pid_dir = pid_dir
        self.kind = "process" if pid_dir else cfg.fencing.agent
        self.fired: str | None = None
        self.fs: Any = None
        self.watcher: Any = None
        self.devices: list[Any] = [dev]          # every handle that must stop writing
        self._agent: Any = None
        self._owned: list[Any] = []              # handles opened here, closed at the end

    # -- once the FUSE mount is up ---------------------------------------------------
    def record_mount(self, mountpoint: str) -> None:
        """The process agent: record our FUSE mount (as our own mountinfo shows it,
        without a look at the mount) beside our pid record, so that a fencer whose
        SIGKILL leaves us half-dead can abort that connection, and only that one
        (clusterfs.fence.agent). Best effort: without it a half-dead node waits for
        the harness (or a human) to abort it."""
        if not self.pid_dir:
            return
        from clusterfs.fence.fuseconn import fuse_mount_at
        from clusterfs.fence.pidfile import write_mount_record

        try:
            mount = fuse_mount_at(mountpoint)
            if mount is None:
                log.warning("node %d: our FUSE mount on %s is not in mountinfo: not "
                            "recorded for fencing", self.node_id, mountpoint)
                return
            write_mount_record(self.pid_dir, self.node_id, self.incarnation, mount)
        except OSError as exc:
            log.warning("node %d: cannot record our FUSE mount for fencing: %s",
                        self.node_id, exc)

    # -- before joining -------------------------------------------------------------
    def prepare_device(self) -> None:
        """Register our key through the mount's own session (scsi-pr), and hear of a
        reservation conflict on it. FenceError / StorageError: one line."""
        if hasattr(self.dev, "on_fenced"):
            self.dev.on_fenced = self.stop_writing
        if self.kind != "scsi-pr":
            return
        if getattr(self.dev, "proxied", False):
            # registrations belong to an I_T nexus, and this node has none: its writes
            # ride the servers' registered sessions, so it is fenced at the servers
            log.info("node %d: no path of its own to the LUN: nothing to register; it is "
                     "fenced by the storage group's block servers", self.node_id)
            return
        self._register(self.dev)

    def _register(self, dev: Any) -> None:
        from clusterfs.fence import scsi_pr

        if not hasattr(dev, "pr_register"):
            raise FenceError(f"{self.path}: fencing agent 'scsi-pr' needs an iSCSI LUN "
                             "(iscsi://...) as the mounted device")
        key = scsi_pr.pr_key(self.cfg.name, self.node_id)
        scsi_pr.register(dev, key)
        log.info("node %d: key %#x registered on %s (scsi-pr fencing)", self.node_id, key,
                 self.path)

    def agent(self) -> FenceAgent:
        """The agent the survivors' coordinator fences through (built once)."""
        if self._agent is None:
            inner = self._configured_agent()
            if self.cfg.block_servers:
                from clusterfs.storage.groupfence import StorageGroupFence

                self._agent = StorageGroupFence(self.cfg, self.node_id, inner, self.kind)
            else:
                self._agent = inner
        return self._agent

    async def hold_members(self, membership: Any) -> None:
        """The process agent: as nodes come into our view, hold each one's process
        (its pid record, a pidfd), so that fencing one later opens no file: a view
        that only removes nodes brings no new incarnation, so nothing is read then
        (clusterfs.failover). A task for the node's lifetime."""
        agent = self.agent()
        if self.cfg.block_servers:
            from clusterfs.storage.groupfence import StorageGroupFence

            if isinstance(agent, StorageGroupFence):
                agent = agent.inner      # the process agent it wraps, if any
        if not isinstance(agent, ProcessAgent):
            return
        async for ev in membership.subscribe():
            if isinstance(ev, ViewChange):
                members = membership.installed_incarnations.get(ev.view.generation, {})
                for node_id, incarnation in sorted(members.items()):
                    if node_id != self.node_id:
                        agent.expect(node_id, incarnation)

    def _configured_agent(self) -> FenceAgent | None:
        """The config's agent (or the dev cluster's process agent); None for scsi-pr on
        a node without a path to the LUN (a block server preempts for it)."""
        if self.pid_dir:
            return ProcessAgent(pid_dir=self.pid_dir)
        if self.kind == "scsi-pr" and not self.cfg.reaches_disk(self.node_id):
            return None
        from clusterfs.fence.factory import make_agent

        return make_agent(self.cfg, self.node_id, device=self.dev,
                          open_device=lambda p: self.open_device(p, "fence"))

    def attach_storage(self, membership: Any, server: Any = None) -> None:
        """Once joined: the storage-group agent learns the view, and its own block
        server, which may fence nodes with a path on other members' behalf."""
        from clusterfs.storage.groupfence import StorageGroupFence

        agent = self._agent
        if not isinstance(agent, StorageGroupFence):
            return
        agent.attach(lambda: (membership.view.generation, membership.view.members), server)
        if server is not None and agent.inner is not None:
            server.fence_disk_node = agent.inner.fence

    # -- once the journal slot is ours ----------------------------------------------
    async def claim_slot(self, slot: int, nursery: trio.Nursery) -> None:
        """poison-pill: claim heartbeat slot `slot` and start watching it (a handle
        of its own, so its reads never queue behind the data path)."""
        if self.kind != "poison-pill":
            return
        from clusterfs.fence.poison_pill import PillWatcher
        from clusterfs.fence.poison_pill import claim_slot as claim

        claim(self.dev, self.sb, slot, self.node_id, self.incarnation)
        watch_dev = self.open_device(self.path, "watch")
        self._owned.append(watch_dev)
        f = self.cfg.fencing
        self.watcher = PillWatcher.for_slot(watch_dev, self.sb, slot, self.node_id,
                                            self.incarnation, on_pill=self.stop_writing,
                                            interval=f.interval, timeout=f.timeout)
        for dev in self.devices:
            dev.guard_writes(self.watcher.check_writable)
        nursery.start_soon(self.watcher.run)
        log.info("node %d: heartbeat slot %d claimed; pill watcher every %.1f s "
                 "(timeout %.1f s)", self.node_id, slot, f.interval, f.timeout)

    def add_device(self, dev: Any) -> None:
        """Another handle this node writes through (a block server's): it stops with
        the others, and is guarded by the watcher as they are."""
        if self.kind == "scsi-pr":
            self._register(dev)
        self.devices.append(dev)
        if self.watcher is not None:
            dev.guard_writes(self.watcher.check_writable)
        if self.fired is not None:
            dev.refuse_writes(self.fired)

    def own(self, dev: Any) -> None:
        """Close `dev` with the fencing handles at the end of the mount."""
        self._owned.append(dev)

    def attach(self, fs: Any) -> None:
        self.fs = fs
        if self.fired is not None:
            fs.txn.withdraw(self.fired)

    # -- fenced ---------------------------------------------------------------------
    def stop_writing(self, reason: str) -> None:
        """This node was fenced: every handle refuses writes from now on, and the
        filesystem withdraws (any thread; only flags are set)."""
        if self.fired is None:
            self.fired = reason
            log.error("node %d fenced: %s; refusing every write and withdrawing",
                      self.node_id, reason)
        for dev in self.devices:
            dev.refuse_writes(reason)
        if self.fs is not None:
            self.fs.txn.withdraw(reason)

    def statistics(self) -> dict[str, Any]:
        agent = self._agent
        return {"agent": self.kind, "fenced": self.fired,
                "agent_stats": agent.statistics() if hasattr(agent, "statistics") else {},
                "watcher": self.watcher.statistics() if self.watcher is not None else None}

    def close(self) -> None:
        closers = [*self._owned]
        if self._agent is not None and hasattr(self._agent, "close"):
            closers.append(self._agent)
        for thing in closers:
            try:
                thing.close()
            except ClusterFSError as exc:
                log.debug("closing a fencing handle: %s", exc)
