"""The membership service: heartbeats, failure detection, views, quorum, expulsion, fencing.

It implements the Membership contract of clusterfs.membership.view over any
Endpoint (TCP or the in-memory transport). The algorithm (docs/cluster.md):

- Every node gets a random 64-bit *incarnation* at start; a restarted node is a
  new incarnation and is told apart from a stale one.
- Every `heartbeat_interval` each node sends HEARTBEAT {inc, state, gen, members,
  quorate} to every other configured node. A peer not heard from for
  `failure_timeout` is dead to us - counted only over time in which we could
  have heard it: from our own start (a member we have not heard from since we
  started is *presumed alive* for a full failure timeout, not dead: a restarted
  node must not remove live members it simply has not heard from yet), and not
  counting the time our own event loop was stalled (heartbeats that were
  waiting for us to run are no evidence of a peer's death).
- The *coordinator* is the lowest-id live member of the current view (a joining
  node proposes only when no live node is a member of any view). It proposes a
  new view when its view has a dead member, a member with a new incarnation, a
  member lagging on an older generation, or an admissible joiner (JOINING, or a
  member of a non-quorate view: a partition without quorum granted nothing and
  may merge back).
- Three phases: VIEW_PROPOSE {gen, coord, members:{id: inc}, base, bkey, prior, ...}
  with gen = 1 + the highest generation this node has seen anywhere; each target
  catches up on `prior` (the coordinator's installed view) if it missed it, then
  promises if gen is above every generation it promised or holds (one promise per
  generation), when its own view is quorate only if coord belongs to that view, and
  only if - being in `base` - it holds exactly view `bkey` (a view follows one view).
  Answers carry what the target holds; the coordinator first catches up on it (a
  newer installed view, a committed view whose coordinator died: it finishes that
  one, a Fenced it missed). With every promise in: VIEW_COMMIT, which a target keeps
  as its tentative view only if it still promises exactly that proposal. With every
  commit confirmed: VIEW_ACTIVATE carrying the view, on which each member installs
  and publishes it and relays the activation once to the other members, so a
  coordinator dying half-way through leaves no member behind. A coordinator that
  dies is replaced by the next-lowest live member after the failure timeout.
- Quorum: a view is quorate when it holds a strict majority of configured nodes.
  Only quorate views expel: the (node, incarnation) pairs a quorate view removed
  are remembered (and passed on in every commit); when such a node is heard from
  again, it is sent EXPELLED, publishes ExpelledEvent, and must restart clean.
- Fencing: nodes a view removed wait in `pending_fence`; the coordinator of a
  quorate view runs the fence agent for each, then sends FENCE_DONE {gen, nodes}
  to every member (itself included); each member publishes Fenced(gen, nodes)
  if it is still in view `gen` (so always after that view's ViewChange). A newer
  view aborts the fencing; its coordinator fences what is still pending.
- Every member publishes ViewChange(view, joined, left) computed against the
  coordinator's previous view (`base`), which is also its own previous view unless
  it joins; the Fenced of the base view travels with the next view (`bfenced`), so
  members that carry on together see the same events in the same order.

The service is built in layers, one module each (state.py lists them): this
module holds only the public contract; proposals.py the coordinator,
promises.py the targets, detection.py heartbeats, installation.py view
installation and expulsion, fencing.py fencing, state.py the shared state.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import trio

from clusterfs import failover
from clusterfs.comms.interface import Endpoint
from clusterfs.errors import Expelled
from clusterfs.membership.generation_record import GenerationRecord
from clusterfs.membership.proposals import Proposals
from clusterfs.membership.state import (
    EXPELLED,
    JOINING,
    LEAVING,
    MEMBER,
    DiskPath,
    FenceHook,
    PeerInfo,
    log,
    new_incarnation,
)
from clusterfs.membership.view import Event, ExpelledEvent, View, ViewChange
from clusterfs.wire.types import MsgType

# the names other layers and the tests take from here
__all__ = ["EXPELLED", "JOINING", "LEAVING", "MEMBER", "DiskPath", "FenceHook", "MembershipService",
           "MembershipStatistics", "PeerInfo", "new_incarnation"]

@dataclass
class MembershipStatistics:
    node_id: int
    incarnation: int
    state: str
    generation: int
    members: list[int]
    quorate: bool
    coordinator: int | None
    cluster_size: int
    expected: list[int]
    views_installed: int
    proposals: int
    proposals_failed: int
    expelled_sent: int
    pending_fence: list[int]
    removed: dict[int, int]
    peers: dict[int, dict[str, Any]] = field(default_factory=dict)
    probes: int = 0               # suspicions: probes sent, answered, not answered
    probes_answered: int = 0
    probes_unanswered: int = 0
    suspicions_heard: int = 0     # suspicions of a node heard within their quiet: no probe
    probes_spared: int = 0        # unanswered probes of a node whose beacon says: stalled


class MembershipService(Proposals):
    """The membership service of one node (the Membership contract of view.py)."""

    def __init__(self, endpoint: Endpoint, node_ids: Iterable[int], *,
                 heartbeat_interval: float = 0.5, failure_timeout: float = 3.0,
                 fence_agent: FenceHook | None = None, incarnation: int | None = None,
                 settle: float | None = None,
                 generation_record: GenerationRecord | None = None,
                 disk: DiskPath | None = None, probe_timeout: float | None = None) -> None:
        super().__init__(endpoint, node_ids, heartbeat_interval=heartbeat_interval,
                         failure_timeout=failure_timeout, fence_agent=fence_agent,
                         incarnation=incarnation, settle=settle,
                         generation_record=generation_record, disk=disk,
                         probe_timeout=probe_timeout)
        endpoint.register([MsgType.HEARTBEAT], self._on_heartbeat)
        endpoint.register([MsgType.VIEW_PROPOSE], self._on_propose)
        endpoint.register([MsgType.VIEW_ACK], self._on_ack)
        endpoint.register([MsgType.VIEW_COMMIT], self._on_commit)
        endpoint.register([MsgType.VIEW_ACTIVATE], self._on_activate)
        endpoint.register([MsgType.EXPELLED], self._on_expelled)
        endpoint.register([MsgType.FENCE_DONE], self._on_fence_done)

    def subscribe(self) -> trio.MemoryReceiveChannel[Event]:
        send, recv = trio.open_memory_channel[Event](math.inf)
        if self.state == MEMBER:
            send.send_nowait(ViewChange(self.view, self.view.members, frozenset()))
        elif self.state == EXPELLED:
            send.send_nowait(ExpelledEvent(self.view.generation))
        self._subscribers.append(send)
        return recv

    async def wait_quorum(self) -> View:
        """The current view once it is quorate; blocks without quorum; Expelled if expelled."""
        while True:
            if self.state == EXPELLED:
                raise Expelled(f"node {self.node_id} was expelled in generation "
                               f"{self.view.generation}")
            if self.state == MEMBER and self.view.quorate:
                return self.view
            await self._changed.wait()

    async def leave(self, timeout: float) -> bool:
        """Leave the cluster cleanly (votequorum_leaving, then the leave itself).

        Call only once this node will never write to the shared disk again in this
        life: its journal is clean and it holds no lock. From now on its heartbeats say
        LEAVING; it refuses every proposal, and the coordinator removes it in a new
        view without fencing it, its vote going with it. True once a member shows a
        view without us (or we were alone); False if none did within `timeout` (then
        the others, if they never heard the announcement, take us for dead: fencing
        and replay of a clean journal, safe but slower)."""
        if self.state != MEMBER:
            return False       # joining: nobody counts on us; expelled: fenced already
        others = self.view.members - {self.node_id}
        self.state = LEAVING
        self._leave_gen = self.view.generation
        log.info("node %d gen %d: leaving the cluster cleanly (telling %s)", self.node_id,
                 self.view.generation, sorted(others))
        self._changed.set()
        self._changed = trio.Event()
        if not others:
            return True
        with trio.move_on_after(timeout):
            while True:
                # the announcement, again each round, and once at least: the others
                # leaving at once are done only when they heard it (_all_leaving)
                await self._heartbeat()
                if self._leave_witnesses(others) or self._all_leaving(others):
                    break
                await trio.sleep(self.interval / 2)
            witnesses = self._leave_witnesses(others)
            if witnesses:
                log.info("node %d gen %d: left: node(s) %s installed a view without us",
                         self.node_id, self.view.generation, sorted(witnesses))
            else:
                log.info("node %d gen %d: left together with %s (every member is leaving)",
                         self.node_id, self.view.generation, sorted(others))
            return True
        log.warning("node %d gen %d: no view without us within %.1f s; leaving anyway",
                    self.node_id, self.view.generation, timeout)
        return False

    def _all_leaving(self, others: frozenset[int]) -> bool:
        """Every other member of our last view announces a clean leave too: no one is
        left to install a view without us, and no one needs to (a leaver has its journal
        clean and holds no lock: there is nothing to fence or replay)."""
        return all(self._left_cleanly(n) for n in others)

    def _leave_witnesses(self, others: frozenset[int]) -> set[int]:
        """Members of our last view whose heartbeat shows a newer view without us."""
        return {n for n in others
                if (p := self._peers.get(n)) is not None and p.state == MEMBER
                and p.inc == self._incs.get(n) and p.gen > self._leave_gen
                and self.node_id not in p.members}

    @property
    def generation(self) -> int:
        return self.view.generation

    def statistics(self) -> MembershipStatistics:
        now = trio.current_time() if self._nursery is not None else 0.0
        return MembershipStatistics(
            self.node_id, self.incarnation, self.state, self.view.generation,
            sorted(self.view.members), self.view.quorate,
            self.view.coordinator if self.state == MEMBER else None, self.cluster_size,
            sorted(self._expected), self.views_installed, self.proposals,
            self.proposals_failed, self.expelled_sent,
            sorted(self._pending_fence), dict(self._removed),
            {n: {"alive": self._alive(n, now), "inc": p.inc, "state": p.state, "gen": p.gen,
                 "age": round(now - p.last_seen, 3)} for n, p in sorted(self._peers.items())},
            probes=self.probes, probes_answered=self.probes_answered,
            probes_unanswered=self.probes_unanswered,
            suspicions_heard=self.suspicions_heard, probes_spared=self.probes_spared)

    def dump(self) -> str:
        s = self.statistics()
        lines = [f"node {s.node_id} inc {s.incarnation:#x} {s.state} gen {s.generation} "
                 f"members {s.members} quorate {s.quorate} coordinator {s.coordinator}"]
        for n, p in s.peers.items():
            lines.append(f"  peer {n}: {p}")
        if s.pending_fence:
            lines.append(f"  pending fence: {s.pending_fence}")
        return "\n".join(lines)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self._started_at = self._judge_from = self._last_tick = trio.current_time()
            log.info("node %d inc %#x: membership starting (%d configured nodes)",
                     self.node_id, self.incarnation, self.cluster_size)
            task_status.started()
            try:
                while True:
                    self._discount_stall()
                    await self._heartbeat()
                    if not self._round_running:
                        self._evaluate()
                    await trio.sleep(self.interval)
            finally:
                # a stopped service judges nobody: its phase of the path is over (it
                # was left marked when a member was silent as the service stopped)
                failover.leave("membership")
