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
- Three phases: VIEW_PROPOSE {gen, coord, members:{id: inc}, base, ...} with
  gen = 1 + the highest generation this node has seen anywhere; each target
  promises if gen is above every generation it promised or holds (one promise
  per generation) and, when its own view is quorate, only if coord belongs to
  that view. With every promise in: VIEW_COMMIT, which a target keeps as its
  tentative view only if it still promises exactly that proposal. With every
  commit confirmed: VIEW_ACTIVATE, on which each member installs and publishes
  the view. A coordinator that dies is replaced by the next-lowest live member
  after the failure timeout.
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
  coordinator's previous view (`base`), so all members see the same events.
"""

from __future__ import annotations

import functools
import logging
import math
import random
import secrets
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import trio

from clusterfs.comms.interface import Endpoint, Envelope
from clusterfs.errors import Expelled, PeerUnreachable
from clusterfs.membership.view import Event, ExpelledEvent, Fenced, View, ViewChange
from clusterfs.wire.types import MsgType

log = logging.getLogger(__name__)

JOINING = "joining"
MEMBER = "member"
EXPELLED = "expelled"


def _guarded(fn: Callable[[MembershipService, Envelope], Awaitable[None]]
             ) -> Callable[[MembershipService, Envelope], Awaitable[None]]:
    """A malformed body from an (authenticated) peer is logged and ignored."""
    @functools.wraps(fn)
    async def wrapper(self: MembershipService, env: Envelope) -> None:
        try:
            await fn(self, env)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            log.warning("node %d gen %d: malformed %s from node %d: %r", self.node_id,
                        self.view.generation, fn.__name__[4:], env.sender, exc)
    return wrapper


class FenceHook(Protocol):
    async def fence(self, node_id: int, generation: int) -> None: ...


@dataclass
class PeerInfo:
    inc: int
    state: str
    gen: int
    members: frozenset[int]
    quorate: bool
    last_seen: float


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
    views_installed: int
    proposals: int
    proposals_failed: int
    expelled_sent: int
    pending_fence: list[int]
    removed: dict[int, int]
    peers: dict[int, dict[str, Any]] = field(default_factory=dict)


class MembershipService:
    def __init__(self, endpoint: Endpoint, node_ids: Iterable[int], *,
                 heartbeat_interval: float = 0.5, failure_timeout: float = 3.0,
                 fence_agent: FenceHook | None = None, incarnation: int | None = None,
                 settle: float | None = None) -> None:
        self.endpoint = endpoint
        self.node_id = endpoint.node_id
        self.node_ids = frozenset(node_ids)
        if self.node_id not in self.node_ids:
            raise ValueError(f"node {self.node_id} is not a configured node")
        self.cluster_size = len(self.node_ids)
        self.interval = heartbeat_interval
        self.timeout = failure_timeout
        self.settle = 2.5 * heartbeat_interval if settle is None else settle
        self.fence_agent = fence_agent
        self.incarnation = incarnation if incarnation is not None else secrets.randbits(63) | 1
        self.state = JOINING
        self.view = View(0, frozenset({self.node_id}), False, self.cluster_size)
        self._incs: dict[int, int] = {}
        # a proposal is known by (generation, coordinator, coordinator's incarnation):
        # messages of a coordinator's earlier life never match its new proposals
        self._promised: tuple[int, int, int] = (0, -1, 0)
        self._promised_body: dict[str, Any] | None = None
        self._max_gen = 0
        self._removed: dict[int, int] = {}
        self._pending_fence: dict[int, int] = {}
        self._peers: dict[int, PeerInfo] = {}
        self._suspect_until: dict[int, float] = {}
        self._expel_sent_at: dict[int, float] = {}
        self._acks: dict[int, bool] | None = None
        self._acks_key: tuple[tuple[int, int, int], int] = ((0, -1, 0), 0)
        self._acks_incs: Mapping[int, int] = {}
        self._tentative: Mapping[str, Any] | None = None
        self._acks_changed = trio.Event()
        self._changed = trio.Event()
        self._subscribers: list[trio.MemorySendChannel[Event]] = []
        self._installed_at = 0.0
        self._started_at = 0.0
        # absence of heartbeats counts as evidence of death only from this time on
        # (our start, pushed forward by our own stalls)
        self._judge_from = 0.0
        self._last_tick = 0.0
        self._round_running = False
        self._fencing_gen = 0
        self._nursery: trio.Nursery | None = None
        self.views_installed = 0
        self.proposals = 0
        self.proposals_failed = 0
        self.expelled_sent = 0
        self.events: list[Event] = []        # every event published, for tests and dumps
        endpoint.register([MsgType.HEARTBEAT], self._on_heartbeat)
        endpoint.register([MsgType.VIEW_PROPOSE], self._on_propose)
        endpoint.register([MsgType.VIEW_ACK], self._on_ack)
        endpoint.register([MsgType.VIEW_COMMIT], self._on_commit)
        endpoint.register([MsgType.VIEW_ACTIVATE], self._on_activate)
        endpoint.register([MsgType.EXPELLED], self._on_expelled)
        endpoint.register([MsgType.FENCE_DONE], self._on_fence_done)

    # -- the Membership contract -----------------------------------------------
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

    @property
    def generation(self) -> int:
        return self.view.generation

    def statistics(self) -> MembershipStatistics:
        now = trio.current_time() if self._nursery is not None else 0.0
        return MembershipStatistics(
            self.node_id, self.incarnation, self.state, self.view.generation,
            sorted(self.view.members), self.view.quorate,
            self.view.coordinator if self.state == MEMBER else None, self.cluster_size,
            self.views_installed, self.proposals, self.proposals_failed, self.expelled_sent,
            sorted(self._pending_fence), dict(self._removed),
            {n: {"alive": self._alive(n, now), "inc": p.inc, "state": p.state, "gen": p.gen,
                 "age": round(now - p.last_seen, 3)} for n, p in sorted(self._peers.items())})

    def dump(self) -> str:
        s = self.statistics()
        lines = [f"node {s.node_id} inc {s.incarnation:#x} {s.state} gen {s.generation} "
                 f"members {s.members} quorate {s.quorate} coordinator {s.coordinator}"]
        for n, p in s.peers.items():
            lines.append(f"  peer {n}: {p}")
        if s.pending_fence:
            lines.append(f"  pending fence: {s.pending_fence}")
        return "\n".join(lines)

    # -- running -----------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self._started_at = self._judge_from = self._last_tick = trio.current_time()
            log.info("node %d inc %#x: membership starting (%d configured nodes)",
                     self.node_id, self.incarnation, self.cluster_size)
            task_status.started()
            while True:
                self._discount_stall()
                await self._heartbeat()
                if not self._round_running:
                    self._evaluate()
                await trio.sleep(self.interval)

    # -- heartbeats and failure detection ------------------------------------------
    def _heartbeat_body(self) -> dict[str, Any]:
        return {"inc": self.incarnation, "st": self.state, "gen": self.view.generation,
                "m": sorted(self.view.members) if self.state == MEMBER else [],
                "q": self.view.quorate and self.state == MEMBER}

    async def _heartbeat(self) -> None:
        body = self._heartbeat_body()
        for n in self.node_ids:
            if n != self.node_id:
                await self._send(n, MsgType.HEARTBEAT, body)

    async def _send(self, dest: int, mtype: int, body: Any) -> bool:
        try:
            await self.endpoint.send(dest, mtype, body)
            return True
        except PeerUnreachable:
            return False

    def _discount_stall(self) -> None:
        """If our own loop did not run for a while, that time is not a peer's silence.

        Heartbeats that arrived while we were stalled (a loaded machine, a long GC,
        SIGSTOP) are still waiting in our sockets and inbox; judging peers before we
        have read them would remove live nodes. Every peer gets the stalled time back.
        """
        now = trio.current_time()
        excess = now - self._last_tick - self.interval
        self._last_tick = now
        if excess <= self.interval:
            return
        log.info("node %d gen %d: our loop stalled %.2f s; not counting it as peers' "
                 "silence", self.node_id, self.view.generation, excess)
        self._judge_from = min(now, self._judge_from + excess)
        for p in self._peers.values():
            p.last_seen = min(now, p.last_seen + excess)

    def _alive(self, n: int, now: float) -> bool:
        if n == self.node_id:
            return True
        p = self._peers.get(n)
        if p is None:
            # never heard since we started: presumed alive for a full failure timeout
            return now - self._judge_from <= self.timeout
        return (now - max(p.last_seen, self._judge_from) <= self.timeout
                and p.state != EXPELLED)

    @_guarded
    async def _on_heartbeat(self, env: Envelope) -> None:
        b = env.body
        n = env.sender
        if n not in self.node_ids or n == self.node_id:
            return
        now = trio.current_time()
        info = PeerInfo(int(b["inc"]), str(b["st"]), int(b["gen"]), frozenset(b["m"]),
                        bool(b["q"]), now)
        old = self._peers.get(n)
        if old is not None and old.inc != info.inc:
            log.info("node %d gen %d: node %d has a new incarnation %#x (was %#x)",
                     self.node_id, self.view.generation, n, info.inc, old.inc)
        self._peers[n] = info
        self._max_gen = max(self._max_gen, info.gen)
        if (self.state == MEMBER and self.view.quorate and self._removed.get(n) == info.inc
                and info.state != EXPELLED
                and now - self._expel_sent_at.get(n, -math.inf) >= self.interval):
            self._expel_sent_at[n] = now
            self.expelled_sent += 1
            log.warning("node %d gen %d: node %d (inc %#x) was removed from the cluster; "
                        "telling it it is expelled", self.node_id, self.view.generation, n,
                        info.inc)
            await self._send(n, MsgType.EXPELLED, {"gen": self.view.generation, "inc": info.inc})
        if self._pending_fence:
            self._maybe_fence()

    # -- the coordinator's decision ------------------------------------------------
    def _evaluate(self) -> None:
        if self.state == EXPELLED:
            return
        now = trio.current_time()
        if self.state == JOINING and now - self._started_at < self.settle:
            return   # listen a little before forming a view of our own

        def usable(n: int) -> bool:
            return self._alive(n, now) and self._suspect_until.get(n, -math.inf) < now

        base = self.view.members if self.state == MEMBER else frozenset()
        keep = {self.node_id}
        lagging = False
        for n in base:
            if n == self.node_id:
                continue
            p = self._peers.get(n)
            if not usable(n):
                continue
            if p is None:
                keep.add(n)   # not heard from since we started, but presumed alive
                continue
            if p.inc != self._incs.get(n):
                continue      # restarted: the view's incarnation is gone
            if p.state == MEMBER and self.node_id not in p.members and (
                    p.gen > self.view.generation
                    or (p.gen == self.view.generation and p.members != self.view.members)):
                continue   # it moved on to a view without us: it is no longer in ours
            keep.add(n)
            # heard since well after our install, still on another view: resync
            if ((p.gen != self.view.generation or p.members != self.view.members)
                    and p.state == MEMBER
                    and now - self._installed_at > 2 * self.interval + self.timeout / 2):
                lagging = True
        admissible: set[int] = set()
        member_elsewhere = quorate_elsewhere = False
        for n, p in self._peers.items():
            if n in base or not usable(n):
                continue
            if p.state == MEMBER:
                member_elsewhere = True
                quorate_elsewhere |= p.quorate
            if self._removed.get(n) == p.inc:
                continue
            if p.state == JOINING or (p.state == MEMBER and not p.quorate):
                admissible.add(n)
        if self.state == JOINING:
            # propose only if nobody is a member anywhere and we are the lowest joiner
            if member_elsewhere or min(admissible | {self.node_id}) != self.node_id:
                return
        elif self.view.quorate:
            # the lowest live member coordinates a quorate view; it admits joiners
            # and members of non-quorate partitions
            if min(keep) != self.node_id:
                return
        else:
            # without quorum: wait to be admitted by a quorate partition if one is in
            # sight; else the lowest member of all non-quorate partitions merges them
            if quorate_elsewhere:
                admissible = set()
            candidates = keep | {n for n in admissible if self._peers[n].state == MEMBER}
            if min(candidates) != self.node_id:
                return
        target = keep | admissible
        if self.state == MEMBER and target == base and not lagging:
            self._maybe_fence()
            return
        assert self._nursery is not None
        self._round_running = True
        self._nursery.start_soon(self._propose_round, frozenset(target), base)

    async def _propose_round(self, target: frozenset[int], base: frozenset[int]) -> None:
        try:
            await self._propose(target, base)
        finally:
            self._round_running = False

    async def _propose(self, target: frozenset[int], base: frozenset[int]) -> None:
        gen = max(self.view.generation, self._promised[0], self._max_gen) + 1
        self._max_gen = gen
        key = (gen, self.node_id, self.incarnation)
        members = {n: (self.incarnation if n == self.node_id
                       else self._incs[n] if n in base else self._peers[n].inc)
                   for n in target}
        quorate = 2 * len(target) > self.cluster_size
        pending = dict(self._pending_fence)
        for n in base - target:
            pending[n] = self._incs[n]
        for n in list(pending):
            if n in target:
                # same incarnation: merged back from a non-quorate partition (it granted
                # nothing); new incarnation: the old process is gone (the new one owns the
                # node's address). Either way there is nothing left to fence.
                del pending[n]
        removed = dict(self._removed)
        if quorate:
            removed.update(pending)   # a quorate view expels what it removes
        body = {"gen": gen, "coord": self.node_id, "cinc": self.incarnation, "members": members,
                "base": sorted(base), "quorate": quorate,
                "removed": removed, "fence": pending}
        self.proposals += 1
        log.info("node %d gen %d: proposing view %d members %s (base %s, quorate %s)",
                 self.node_id, self.view.generation, gen, sorted(target), sorted(base), quorate)
        self._promised = key
        self._promised_body = body
        others = [n for n in target if n != self.node_id]
        # phase 1: propose; every target promises (or refuses)
        failed, missing = await self._phase(key, others, MsgType.VIEW_PROPOSE, body,
                                            members)
        if not (failed or missing or self._promised != key or self.state == EXPELLED):
            # phase 2: commit; every target holds it as its tentative next view
            self._tentative = body
            failed, missing = await self._phase(key, others, MsgType.VIEW_COMMIT,
                                                {"gen": gen, "coord": self.node_id,
                                                 "cinc": self.incarnation}, members)
            if not (failed or missing or self.state == EXPELLED
                    or self._tentative is not body or self.view.generation >= gen):
                # phase 3: every member has it: activate (publish) everywhere
                for n in others:
                    await self._send(n, MsgType.VIEW_ACTIVATE,
                                     {"gen": gen, "coord": self.node_id,
                                      "cinc": self.incarnation})
                self._install(body)
                return
        self.proposals_failed += 1
        now = trio.current_time()
        for n in missing:
            self._suspect_until[n] = now + self.timeout
        log.info("node %d gen %d: proposal %d failed (refused by %s, no answer from %s, "
                 "superseded %s)", self.node_id, self.view.generation, gen, sorted(failed),
                 sorted(missing), self._promised != key)
        await trio.sleep(random.uniform(0, self.interval))

    async def _phase(self, key: tuple[int, int, int], others: list[int], mtype: int,
                     body: Any, members: Mapping[int, int]) -> tuple[set[int], set[int]]:
        """Send to every other target and collect yes/no answers; (refused, missing)."""
        self._acks_key = (key, mtype)
        self._acks_incs = members
        self._acks = {}
        self._acks_changed = trio.Event()
        for n in others:
            await self._send(n, mtype, body)
        failed: set[int] = set()
        with trio.move_on_after(max(self.timeout / 2, 2 * self.interval)):
            while True:
                failed = {n for n, ok in self._acks.items() if not ok}
                if failed or all(n in self._acks for n in others):
                    break
                await self._acks_changed.wait()
                self._acks_changed = trio.Event()
        acks = self._acks
        self._acks = None
        return failed, {n for n in others if n not in acks}

    @_guarded
    async def _on_propose(self, env: Envelope) -> None:
        b = env.body
        gen, coord, cinc = int(b["gen"]), int(b["coord"]), int(b["cinc"])
        self._max_gen = max(self._max_gen, gen)
        members = {int(k): int(v) for k, v in b["members"].items()}
        ok = True
        why = ""
        if self.state == EXPELLED:
            ok, why = False, "expelled"
        elif members.get(self.node_id) != self.incarnation:
            ok, why = False, "not my incarnation"
        elif gen <= self._promised[0] or gen <= self.view.generation:
            # one promise per generation: of two competing proposals of one generation
            # at most one can gather its acks
            ok, why = False, f"promised {self._promised}, at gen {self.view.generation}"
        elif self.state == MEMBER and self.view.quorate and coord not in self.view.members:
            ok, why = False, "coordinator outside my quorate view"
        if ok:
            self._promised = (gen, coord, cinc)
            self._promised_body = b
        else:
            log.info("node %d gen %d: refusing view %d from %d: %s", self.node_id,
                     self.view.generation, gen, coord, why)
        await self._send(coord, MsgType.VIEW_ACK,
                         {"gen": gen, "coord": coord, "cinc": cinc, "ok": ok,
                          "inc": self.incarnation,
                          "max_gen": self._max_gen,
                          "phase": int(MsgType.VIEW_PROPOSE)})

    @_guarded
    async def _on_ack(self, env: Envelope) -> None:
        b = env.body
        self._max_gen = max(self._max_gen, int(b["max_gen"]))
        if self._acks is None or ((int(b["gen"]), int(b["coord"]), int(b["cinc"])),
                                  int(b["phase"])) != self._acks_key:
            return
        if self._acks_incs.get(env.sender) != int(b["inc"]):
            return      # from an earlier life of that node
        self._acks[env.sender] = bool(b["ok"])
        self._acks_changed.set()

    @_guarded
    async def _on_commit(self, env: Envelope) -> None:
        b = env.body
        key = (int(b["gen"]), int(b["coord"]), int(b["cinc"]))
        ok = (key == self._promised and self._promised_body is not None
              and key[0] > self.view.generation and self.state != EXPELLED)
        if ok:
            self._tentative = self._promised_body
        else:
            log.info("node %d gen %d: refusing commit of view %d from %d (promised %s)",
                     self.node_id, self.view.generation, key[0], key[1], self._promised)
        await self._send(key[1], MsgType.VIEW_ACK,
                         {"gen": key[0], "coord": key[1], "cinc": key[2], "ok": ok,
                          "inc": self.incarnation,
                          "max_gen": self._max_gen,
                          "phase": int(MsgType.VIEW_COMMIT)})

    @_guarded
    async def _on_activate(self, env: Envelope) -> None:
        key = (int(env.body["gen"]), int(env.body["coord"]), int(env.body["cinc"]))
        t = self._tentative
        if (t is None or (int(t["gen"]), int(t["coord"]), int(t["cinc"])) != key
                or key[0] <= self.view.generation or self.state == EXPELLED):
            log.info("node %d gen %d: ignoring activation of view %d from %d", self.node_id,
                     self.view.generation, key[0], key[1])
            return
        self._install(t)
        await self._send(key[1], MsgType.HEARTBEAT, self._heartbeat_body())  # confirms it

    def _install(self, b: Mapping[str, Any]) -> None:
        gen = int(b["gen"])
        if gen <= self.view.generation:   # generations only grow, whatever the race
            log.error("node %d gen %d: not installing older view %d", self.node_id,
                      self.view.generation, gen)
            return
        members = {int(k): int(v) for k, v in b["members"].items()}
        base = frozenset(int(n) for n in b["base"])
        new = View(gen, frozenset(members), bool(b["quorate"]), self.cluster_size)
        change = ViewChange(new, new.members - base, base - new.members)
        self.view = new
        self._tentative = None
        self._incs = members
        self.state = MEMBER
        self._installed_at = trio.current_time()
        self._removed = {int(k): int(v) for k, v in b["removed"].items()}
        self._pending_fence = {int(k): int(v) for k, v in b["fence"].items()}
        self.endpoint.generation = gen
        self.views_installed += 1
        log.info("node %d gen %d: installed view: members %s joined %s left %s quorate %s "
                 "coordinator %d", self.node_id, gen, sorted(new.members), sorted(change.joined),
                 sorted(change.left), new.quorate, new.coordinator)
        self._publish(change)
        self._maybe_fence()

    # -- fencing ---------------------------------------------------------------------
    def _maybe_fence(self) -> None:
        v = self.view
        if (self.state != MEMBER or not v.quorate or v.coordinator != self.node_id
                or not self._pending_fence or self._fencing_gen == v.generation):
            return
        # Fence only once every member has confirmed (by a heartbeat sent after our
        # install) that it holds exactly this view: a coordinator whose commit lost a
        # race against a competing proposal must not fence anybody.
        for n in v.members:
            p = self._peers.get(n)
            if n != self.node_id and (p is None or p.gen != v.generation
                                      or p.members != v.members
                                      or p.last_seen < self._installed_at):
                return
        assert self._nursery is not None
        self._fencing_gen = v.generation
        self._nursery.start_soon(self._fence, v.generation, frozenset(self._pending_fence))

    async def _fence(self, gen: int, nodes: frozenset[int]) -> None:
        for n in sorted(nodes):
            while True:
                if self.view.generation != gen:
                    log.info("node %d gen %d: fencing for view %d superseded", self.node_id,
                             self.view.generation, gen)
                    return
                log.info("node %d gen %d: fencing node %d", self.node_id, gen, n)
                try:
                    if self.fence_agent is not None:
                        await self.fence_agent.fence(n, gen)
                    break
                except Exception as exc:  # an agent failure must not kill membership
                    log.error("node %d gen %d: fencing node %d failed: %s; retrying",
                              self.node_id, gen, n, exc)
                    await trio.sleep(self.interval)
        if self.view.generation != gen:
            return
        log.info("node %d gen %d: fencing of %s done; telling members", self.node_id, gen,
                 sorted(nodes))
        body = {"gen": gen, "nodes": sorted(nodes), "inc": self.incarnation}
        for n in sorted(self.view.members):
            if n != self.node_id:
                await self._send(n, MsgType.FENCE_DONE, body)
        self._fence_done(gen, frozenset(nodes))

    @_guarded
    async def _on_fence_done(self, env: Envelope) -> None:
        if (self.state != MEMBER or env.sender != self.view.coordinator
                or int(env.body["inc"]) != self._incs.get(env.sender)):
            log.warning("node %d gen %d: FENCE_DONE from node %d, not my coordinator; ignored",
                        self.node_id, self.view.generation, env.sender)
            return
        self._fence_done(int(env.body["gen"]), frozenset(int(n) for n in env.body["nodes"]))

    def _fence_done(self, gen: int, nodes: frozenset[int]) -> None:
        if self.state != MEMBER or gen != self.view.generation:
            log.info("node %d gen %d: ignoring FENCE_DONE of view %d", self.node_id,
                     self.view.generation, gen)
            return
        for n in nodes:
            self._pending_fence.pop(n, None)
        log.info("node %d gen %d: fenced %s", self.node_id, gen, sorted(nodes))
        self._publish(Fenced(gen, nodes))

    # -- expulsion ---------------------------------------------------------------------
    @_guarded
    async def _on_expelled(self, env: Envelope) -> None:
        if self.state == EXPELLED or int(env.body["inc"]) != self.incarnation:
            return
        self.state = EXPELLED
        self.view = View(self.view.generation, self.view.members, False, self.cluster_size)
        log.error("node %d gen %d: EXPELLED by node %d (its generation %d); must restart "
                  "clean", self.node_id, self.view.generation, env.sender, int(env.body["gen"]))
        self._publish(ExpelledEvent(int(env.body["gen"])))

    def _publish(self, ev: Event) -> None:
        self.events.append(ev)
        for s in list(self._subscribers):
            try:
                s.send_nowait(ev)
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                self._subscribers.remove(s)
        self._changed.set()
        self._changed = trio.Event()

