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
from clusterfs.errors import Expelled, PeerUnreachable, StateError
from clusterfs.membership.generation_record import GenerationRecord, MemoryGenerationRecord
from clusterfs.membership.view import Event, ExpelledEvent, Fenced, View, ViewChange
from clusterfs.wire.types import MsgType

log = logging.getLogger(__name__)

JOINING = "joining"
MEMBER = "member"
EXPELLED = "expelled"

# why a target refuses a proposal whose base view it does not hold
AHEAD = "ahead"      # it installed a newer view than the proposal's base
BEHIND = "behind"    # it missed more than one view: it cannot catch up, only restart

# a proposal (and the view it becomes) is known by (generation, coordinator,
# coordinator's incarnation): messages of a coordinator's earlier life never match
Key = tuple[int, int, int]
NO_VIEW: Key = (0, -1, 0)


def body_key(b: Mapping[str, Any]) -> Key:
    return (int(b["gen"]), int(b["coord"]), int(b["cinc"]))


def body_key_of_base(b: Mapping[str, Any]) -> Key:
    """The key of the view a proposal was built on (NO_VIEW for a first view)."""
    g, c, i = b["bkey"]
    return (int(g), int(c), int(i))


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
    async def fence(self, node_id: int, generation: int,
                    incarnation: int | None = None) -> None: ...


def new_incarnation() -> int:
    """A random odd 63-bit incarnation: a node's identity for one life."""
    return secrets.randbits(63) | 1


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
                 settle: float | None = None,
                 generation_record: GenerationRecord | None = None) -> None:
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
        self.incarnation = incarnation if incarnation is not None else new_incarnation()
        self.state = JOINING
        self.view = View(0, frozenset({self.node_id}), False, self.cluster_size)
        self._incs: dict[int, int] = {}
        self._view_key: Key = NO_VIEW
        self._view_body: dict[str, Any] | None = None     # handed on as `prior`
        self._fenced_here: list[int] | None = None        # Fenced delivered in this view
        self.installed_incarnations: dict[int, dict[int, int]] = {}   # gen -> members
        # what an earlier life of this node promised (generation_record.py): we
        # promise and propose only above it, so generations grow across restarts
        self.generation_record = (generation_record if generation_record is not None
                                  else MemoryGenerationRecord())
        earlier = self.generation_record.durable
        self._promised: Key = (earlier, -1, 0) if earlier else NO_VIEW
        self._promised_body: dict[str, Any] | None = None
        self._max_gen = earlier
        self._removed: dict[int, int] = {}
        self._pending_fence: dict[int, int] = {}
        self._peers: dict[int, PeerInfo] = {}
        self._suspect_until: dict[int, float] = {}
        self._expel_sent_at: dict[int, float] = {}
        self._activation_sent_at: dict[int, float] = {}
        self._acks: dict[int, Mapping[str, Any]] | None = None
        self._acks_key: tuple[Key, int] = (NO_VIEW, 0)
        self._acks_incs: Mapping[int, int] = {}
        self._tentative: Mapping[str, Any] | None = None
        self._committed_at = 0.0
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
        await self._resend_activation(n, info, now)
        if self._pending_fence:
            self._maybe_fence()

    async def _resend_activation(self, n: int, info: PeerInfo, now: float) -> None:
        """A member of our view (this very incarnation: it committed the view) still
        shows an older generation a heartbeat period after we installed it: every copy
        of the activation it was sent was lost (cut links). Send it again; without it,
        a member that is our coordinator would stay joining and nobody would propose."""
        if (self.state != MEMBER or self._incs.get(n) != info.inc or n == self.node_id
                or info.gen >= self.view.generation or self._view_body is None
                or now - self._installed_at < self.interval
                or now - self._activation_sent_at.get(n, -math.inf) < self.interval):
            return
        self._activation_sent_at[n] = now
        log.info("node %d gen %d: node %d has not installed our view; sending it again",
                 self.node_id, self.view.generation, n)
        await self._send(n, MsgType.VIEW_ACTIVATE, dict(self._view_body))

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
        body = self._proposal_body(gen, target, base)
        members: dict[int, int] = body["members"]
        self.proposals += 1
        log.info("node %d gen %d: proposing view %d members %s (base %s, quorate %s)",
                 self.node_id, self.view.generation, gen, sorted(target), sorted(base),
                 body["quorate"])
        self._promised = key
        self._promised_body = body
        durable, why = await self._make_durable(key)
        if not durable:
            self.proposals_failed += 1
            log.error("node %d gen %d: not proposing view %d: %s", self.node_id,
                      self.view.generation, gen, why)
            await trio.sleep(self.interval)
            return
        others = [n for n in target if n != self.node_id]
        # phase 1: propose; every target promises (or refuses) and tells us what it holds
        replies, missing = await self._phase(key, others, MsgType.VIEW_PROPOSE, body, members)
        refused = {n for n, r in replies.items() if not r["ok"]}
        learned = not missing and await self._learn_from(replies)
        if not (missing or refused or learned or self._superseded(key, body)):
            # phase 2: commit; every target holds it as its tentative next view
            self._tentative = body
            replies, missing = await self._phase(key, others, MsgType.VIEW_COMMIT,
                                                 {"gen": gen, "coord": self.node_id,
                                                  "cinc": self.incarnation}, members)
            refused = {n for n, r in replies.items() if not r["ok"]}
            if not (missing or refused or self._superseded(key, body)
                    or self._tentative is not body):
                self._learn_fenced(replies)
                await self._activate(body, others)
                return
        self._round_failed(gen, refused, missing, replies, learned)
        await trio.sleep(random.uniform(0, self.interval))

    def _proposal_body(self, gen: int, target: frozenset[int], base: frozenset[int]
                       ) -> dict[str, Any]:
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
        # base, bkey and prior tie the view to the one it follows: a member of the
        # base installs it only from exactly that view (catching up on `prior`, the
        # view we installed, if it missed its activation), so members that carry on
        # together deliver the same sequence of views
        return {"gen": gen, "coord": self.node_id, "cinc": self.incarnation,
                "members": members, "base": sorted(base), "bkey": list(self._view_key),
                "bfenced": self._fenced_here, "quorate": quorate, "removed": removed,
                "fence": pending, "prior": self._view_body}

    async def _make_durable(self, key: Key) -> tuple[bool, str]:
        """Record the generation we just promised before anyone may count on the
        promise; (True, "") once it is, else (False, why) and the promise is void."""
        try:
            await self.generation_record.raise_to(key[0])
            return True, ""
        except StateError as exc:
            log.error("node %d gen %d: cannot record generation %d: %s", self.node_id,
                      self.view.generation, key[0], exc)
            if self._promised == key:
                self._promised_body = None    # a commit of it is refused
            return False, "generation not durable"

    def _superseded(self, key: Key, body: Mapping[str, Any]) -> bool:
        """True if we may no longer decide this proposal: we promised a newer one,
        installed another view meanwhile, or were expelled."""
        return (self._promised != key or self.state == EXPELLED
                or self._view_key != body_key_of_base(body))

    async def _activate(self, body: dict[str, Any], others: list[int]) -> None:
        """Every member holds the proposal: it is decided. Tell the members and install
        it; each member relays the activation once (see _on_activate), so one member
        that got it is enough for all of them to get it, even if we die now. It
        carries the Fenced we delivered in the base view (see _deliver_base_fenced)."""
        activation = dict(body, bfenced=self._fenced_for(body), prior=None)
        for n in others:
            await self._send(n, MsgType.VIEW_ACTIVATE, activation)
        self._install(activation)

    def _round_failed(self, gen: int, refused: set[int], missing: set[int],
                      replies: Mapping[int, Mapping[str, Any]], learned: bool) -> None:
        self.proposals_failed += 1
        now = trio.current_time()
        # no answer, or cannot follow our view at all (missed more than one view):
        # leave it out of the next proposal
        behind = {n for n in refused if replies[n].get("why") == BEHIND}
        for n in missing | behind:
            self._suspect_until[n] = now + self.timeout
        log.info("node %d gen %d: proposal %d failed (refused by %s, no answer from %s, "
                 "behind %s, learned %s)", self.node_id, self.view.generation, gen,
                 sorted(refused), sorted(missing), sorted(behind), learned)

    async def _learn_from(self, replies: Mapping[int, Mapping[str, Any]]) -> bool:
        """Take in what the targets know and we do not. True if that changes our state
        (the proposal, built on what we knew, is then dropped and rebuilt)."""
        for r in replies.values():
            v = r.get("view")
            if v is not None and int(v["gen"]) > self.view.generation and self._can_install(v):
                log.info("node %d gen %d: catching up on view %d (installed by a target)",
                         self.node_id, self.view.generation, int(v["gen"]))
                self._install(v)
                return True
        learned = self._learn_fenced(replies)
        # after the Fenced: a view we finish carries it (see _fenced_for)
        return await self._complete_held(replies) or learned

    def _learn_fenced(self, replies: Mapping[int, Mapping[str, Any]]) -> bool:
        """A target of our view delivered its Fenced and we did not (its coordinator was
        cut off from us): deliver it too, so the next view carries it. True if so."""
        for r in replies.values():
            fenced = r.get("fenced")
            if (fenced is not None and self._fenced_here is None and self.state == MEMBER
                    and tuple(r["vkey"]) == self._view_key):
                self._fence_done(self.view.generation, frozenset(int(n) for n in fenced))
                return True
        return False

    def _fenced_for(self, b: Mapping[str, Any]) -> list[int] | None:
        """The Fenced that view b carries for its base view: the one we delivered there
        if we hold that view (it may be newer than b's proposal), else its proposer's."""
        if self._view_key == body_key_of_base(b) and self._fenced_here is not None:
            return self._fenced_here
        fenced = b.get("bfenced")
        return None if fenced is None else [int(n) for n in fenced]

    async def _complete_held(self, replies: Mapping[int, Mapping[str, Any]]) -> bool:
        """A view some targets committed but nobody we can reach installed: its
        coordinator died or was cut off between commit and activation. If every target
        that is one of its members committed it (or installed it), it may have been
        decided: finish it (install, activate) so that all its members deliver it.
        If one of them did not, it can never be decided (that member promised us a
        newer generation and refuses its commit): forget it."""
        mine = self._tentative
        held = [mine] if mine is not None and self._follows(mine) else []
        held += [r["held"] for r in replies.values() if r.get("held") is not None]
        held = [h for h in held if int(h["gen"]) > self.view.generation]
        if not held:
            return False
        h = max(held, key=body_key)
        key = body_key(h)
        for n in h["members"]:
            n = int(n)
            if n == self.node_id:
                has = self._tentative is not None and body_key(self._tentative) == key
            elif n in replies:
                r = replies[n]
                has = (tuple(r["vkey"]) == key
                       or r.get("held") is not None and body_key(r["held"]) == key)
            else:
                continue
            if not has:
                return False
        log.info("node %d gen %d: completing view %d of node %d (committed, coordinator "
                 "gone before activating it)", self.node_id, self.view.generation, key[0],
                 key[1])
        activation = dict(h, bfenced=self._fenced_for(h), prior=None)
        for n in h["members"]:
            if int(n) != self.node_id:
                await self._send(int(n), MsgType.VIEW_ACTIVATE, activation)
        if self._can_install(activation):
            self._install(activation)
        return True

    async def _phase(self, key: Key, others: list[int], mtype: int, body: Any,
                     members: Mapping[int, int]
                     ) -> tuple[dict[int, Mapping[str, Any]], set[int]]:
        """Send to every other target and collect their answers; (answers, missing)."""
        self._acks_key = (key, mtype)
        self._acks_incs = members
        self._acks = {}
        self._acks_changed = trio.Event()
        for n in others:
            await self._send(n, mtype, body)
        with trio.move_on_after(max(self.timeout / 2, 2 * self.interval)):
            # wait for every answer, refusals included: what each target holds counts
            while not all(n in self._acks for n in others):
                await self._acks_changed.wait()
                self._acks_changed = trio.Event()
        acks = self._acks
        self._acks = None
        return acks, {n for n in others if n not in acks}

    def _answer(self, key: Key, ok: bool, phase: int, why: str = "") -> dict[str, Any]:
        """An answer to a proposal: yes/no, and what we hold, so the coordinator can
        catch up on a view we installed, finish one we committed, or learn a Fenced."""
        held = self._tentative
        if held is not None and (int(held["gen"]) <= self.view.generation
                                 or not self._follows(held)):
            held = None      # installed, or overtaken by a view we installed since
        return {"gen": key[0], "coord": key[1], "cinc": key[2], "ok": ok, "why": why,
                "inc": self.incarnation, "max_gen": self._max_gen, "phase": phase,
                "vkey": list(self._view_key), "view": self._view_body,
                "held": None if held is None else dict(held, prior=None),
                "fenced": self._fenced_here}

    @_guarded
    async def _on_propose(self, env: Envelope) -> None:
        b = env.body
        gen, coord, cinc = int(b["gen"]), int(b["coord"]), int(b["cinc"])
        self._max_gen = max(self._max_gen, gen)
        members = {int(k): int(v) for k, v in b["members"].items()}
        ok = True
        why = ""
        prior = b.get("prior")
        if (prior is not None and self.state != EXPELLED
                and int(prior["gen"]) > self.view.generation and self._can_install(prior)):
            # the coordinator installed it, so it was decided; we missed its activation
            log.info("node %d gen %d: catching up on view %d (the proposer's)", self.node_id,
                     self.view.generation, int(prior["gen"]))
            self._install(prior)
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
        elif not self._follows(b):
            ok = False
            why = AHEAD if self.view.generation > int(b["bkey"][0]) else BEHIND
        if ok:
            self._promised = (gen, coord, cinc)
            self._promised_body = b
            ok, why = await self._make_durable((gen, coord, cinc))
        if not ok:
            log.info("node %d gen %d: refusing view %d from %d: %s", self.node_id,
                     self.view.generation, gen, coord, why)
        await self._send(coord, MsgType.VIEW_ACK,
                         self._answer((gen, coord, cinc), ok, int(MsgType.VIEW_PROPOSE), why))

    @_guarded
    async def _on_ack(self, env: Envelope) -> None:
        b = env.body
        self._max_gen = max(self._max_gen, int(b["max_gen"]))
        if self._acks is None or ((int(b["gen"]), int(b["coord"]), int(b["cinc"])),
                                  int(b["phase"])) != self._acks_key:
            return
        if self._acks_incs.get(env.sender) != int(b["inc"]):
            return      # from an earlier life of that node
        self._acks[env.sender] = b
        self._acks_changed.set()

    @_guarded
    async def _on_commit(self, env: Envelope) -> None:
        b = env.body
        key = (int(b["gen"]), int(b["coord"]), int(b["cinc"]))
        promised = self._promised_body
        ok = (key == self._promised and promised is not None
              and key[0] > self.view.generation and self.state != EXPELLED
              and self._follows(promised))
        if ok:
            self._tentative = promised
            self._committed_at = trio.current_time()
        else:
            log.info("node %d gen %d: refusing commit of view %d from %d (promised %s)",
                     self.node_id, self.view.generation, key[0], key[1], self._promised)
        await self._send(key[1], MsgType.VIEW_ACK,
                         self._answer(key, ok, int(MsgType.VIEW_COMMIT)))

    @_guarded
    async def _on_activate(self, env: Envelope) -> None:
        b = env.body
        key = body_key(b)
        if (self.state == EXPELLED or key[0] <= self.view.generation
                or not self._can_install(b)):
            log.info("node %d gen %d: ignoring activation of view %d from %d", self.node_id,
                     self.view.generation, key[0], env.sender)
            return
        self._install(b)
        # relay once: if the coordinator died while activating, any member that got
        # the activation hands it on, so either no survivor installs it or all do
        for n in b["members"]:
            if int(n) not in (self.node_id, env.sender, key[1]):
                await self._send(int(n), MsgType.VIEW_ACTIVATE, b)
        await self._send(key[1], MsgType.HEARTBEAT, self._heartbeat_body())  # confirms it

    def _follows(self, b: Mapping[str, Any]) -> bool:
        """True if our history leads into view b: we are not in its base (we join it),
        or the view we hold is exactly its base."""
        return (self.node_id not in {int(n) for n in b["base"]}
                or self._view_key == body_key_of_base(b))

    def _can_install(self, b: Mapping[str, Any]) -> bool:
        """A decided view b may be installed here: it names this incarnation and our
        history leads into it."""
        inc = {int(k): int(v) for k, v in b["members"].items()}.get(self.node_id)
        return (inc == self.incarnation and self.state != EXPELLED
                and int(b["gen"]) > self.view.generation and self._follows(b))

    def _install(self, b: Mapping[str, Any]) -> None:
        gen = int(b["gen"])
        if gen <= self.view.generation:   # generations only grow, whatever the race
            log.error("node %d gen %d: not installing older view %d", self.node_id,
                      self.view.generation, gen)
            return
        if gen > self.generation_record.durable:   # we promised it first: never happens
            log.error("node %d gen %d: installing view %d above the recorded generation %d",
                      self.node_id, self.view.generation, gen, self.generation_record.durable)
        self._deliver_base_fenced(b)
        members = {int(k): int(v) for k, v in b["members"].items()}
        base = frozenset(int(n) for n in b["base"])
        new = View(gen, frozenset(members), bool(b["quorate"]), self.cluster_size)
        change = ViewChange(new, new.members - base, base - new.members)
        self.view = new
        self._view_key = body_key(b)
        self._view_body = dict(b, prior=None)
        self._fenced_here = None
        if self._tentative is not None and int(self._tentative["gen"]) <= gen:
            self._tentative = None
        self._incs = members
        self.installed_incarnations[gen] = dict(members)
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

    def _deliver_base_fenced(self, b: Mapping[str, Any]) -> None:
        """The view's coordinator had seen Fenced in the base view; a member of that
        view that missed the FENCE_DONE delivers it now, before the new view, so every
        member's events between the two views are the same."""
        fenced = b.get("bfenced")
        if (fenced is not None and self._fenced_here is None and self.state == MEMBER
                and self._view_key == body_key_of_base(b)):
            self._fence_done(self.view.generation, frozenset(int(n) for n in fenced))

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
        self._nursery.start_soon(self._fence, v.generation, dict(self._pending_fence))

    async def _fence(self, gen: int, incarnations: Mapping[int, int]) -> None:
        """Fence each removed node's incarnation (node -> incarnation the view saw)."""
        nodes = frozenset(incarnations)
        for n in sorted(nodes):
            while True:
                if self.view.generation != gen:
                    log.info("node %d gen %d: fencing for view %d superseded", self.node_id,
                             self.view.generation, gen)
                    return
                log.info("node %d gen %d: fencing node %d (incarnation %#x)", self.node_id,
                         gen, n, incarnations[n])
                try:
                    if self.fence_agent is not None:
                        await self.fence_agent.fence(n, gen, incarnations[n])
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
        if self._committed_elsewhere(env.sender):
            log.info("node %d gen %d: FENCE_DONE from node %d left to the next view (we "
                     "committed one of another coordinator)", self.node_id,
                     self.view.generation, env.sender)
            return
        self._fence_done(int(env.body["gen"]), frozenset(int(n) for n in env.body["nodes"]))

    def _committed_elsewhere(self, fencer: int) -> bool:
        """We committed a view that follows ours, proposed by another node than the one
        that fenced: its coordinator activates it with the Fenced it knows of (it learns
        ours from our commit answer), so delivering this one now could make our events
        differ from the other members'. Only for a failure timeout: a view that is not
        activated by then is dead, and the Fenced must not be lost."""
        t = self._tentative
        return (t is not None and int(t["coord"]) != fencer
                and body_key_of_base(t) == self._view_key
                and trio.current_time() - self._committed_at < self.timeout)

    def _fence_done(self, gen: int, nodes: frozenset[int]) -> None:
        # one Fenced per view: a late FENCE_DONE after a catch-up is not delivered twice
        if self.state != MEMBER or gen != self.view.generation or self._fenced_here is not None:
            log.info("node %d gen %d: ignoring FENCE_DONE of view %d", self.node_id,
                     self.view.generation, gen)
            return
        for n in nodes:
            self._pending_fence.pop(n, None)
        self._fenced_here = sorted(nodes)
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

