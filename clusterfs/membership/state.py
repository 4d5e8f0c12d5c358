"""One node's membership state, and the vocabulary every part of the service shares.

The service (service.py) is one object built in layers, each a class in its own
module that builds on the ones below it, all working on the state held here:

    service.py       the Membership contract: subscribe, wait_quorum, statistics, run
    proposals.py     the coordinator: decide on a new view, propose, commit, activate
    promises.py      a target: promise a proposal, commit it
    detection.py     heartbeats and failure detection; telling expelled nodes
    installation.py  installing a decided view; being expelled
    fencing.py       fencing removed nodes and announcing Fenced
    state.py         the state, sending, publishing events (this module)

The algorithm is described in service.py and docs/cluster.md.
"""

from __future__ import annotations

import functools
import logging
import secrets
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import trio

from clusterfs import failover
from clusterfs.comms.beacon import Ages
from clusterfs.comms.interface import Endpoint, Envelope
from clusterfs.errors import PeerUnreachable
from clusterfs.membership.generation_record import GenerationRecord, MemoryGenerationRecord
from clusterfs.membership.view import Event, View

log = logging.getLogger("clusterfs.membership.service")

JOINING = "joining"
MEMBER = "member"
EXPELLED = "expelled"
# announced by a member that unmounted cleanly (journal clean, every lock released):
# it will never write again in this life; the others remove it without fencing it
LEAVING = "leaving"

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


def guarded(fn: Callable[[MembershipState, Envelope], Awaitable[None]]
             ) -> Callable[[MembershipState, Envelope], Awaitable[None]]:
    """A malformed body from an (authenticated) peer is logged and ignored."""
    @functools.wraps(fn)
    async def wrapper(self: MembershipState, env: Envelope) -> None:
        try:
            await fn(self, env)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            log.warning("node %d gen %d: malformed %s from node %d: %r", self.node_id,
                        self.view.generation, fn.__name__[4:], env.sender, exc)
    return wrapper


class FenceHook(Protocol):
    async def fence(self, node_id: int, generation: int,
                    incarnation: int | None = None) -> None: ...


class DiskPath(Protocol):
    """Membership's second path: the nodes' heartbeats on the shared disk (the node layer
    reads and writes them, clusterfs/node/diskbeat.py; membership only asks)."""

    def alive(self) -> frozenset[int]:
        """Other nodes whose disk heartbeat changed within the failure timeout."""

    def quorate_members(self) -> frozenset[int]:
        """Of those, the ones whose last heartbeat says: member of a quorate view."""

    def own_ok(self) -> bool:
        """Our own heartbeat was written recently enough that nobody can take us for
        dead on the disk yet."""


class LivenessPath(Protocol):
    """What a node's beacon thread last said of another node's process
    (clusterfs/comms/beacon.py): apart from its event loop, so a loop that stalls
    is told from a process that stopped."""

    def ages(self, node: int) -> Ages | None:
        """None if never heard; else what its newest beacon says, in seconds before
        now (comms/beacon.py Ages)."""


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
    heard_since: float = 0.0   # start of the current run of heartbeats (no gap > timeout)



class MembershipState:
    """Everything one node knows about the cluster; no protocol logic beyond sending
    a message and publishing an event."""

    def __init__(self, endpoint: Endpoint, node_ids: Iterable[int], *,
                 heartbeat_interval: float = 0.5, failure_timeout: float = 3.0,
                 fence_agent: FenceHook | None = None, incarnation: int | None = None,
                 settle: float | None = None,
                 generation_record: GenerationRecord | None = None,
                 disk: DiskPath | None = None, probe_timeout: float | None = None,
                 liveness: LivenessPath | None = None) -> None:
        self.endpoint = endpoint
        self.disk = disk
        self.liveness = liveness
        self.node_id = endpoint.node_id
        self.node_ids = frozenset(node_ids)
        if self.node_id not in self.node_ids:
            raise ValueError(f"node {self.node_id} is not a configured node")
        self.cluster_size = len(self.node_ids)
        self.interval = heartbeat_interval
        self.timeout = failure_timeout
        # a suspected node's probe (detection.py) gets this long: by default a third of
        # the failure timeout, at least two heartbeat intervals (a loop busy for one
        # interval is no evidence), never more than the failure timeout
        self.probe_timeout = (min(failure_timeout, max(2 * heartbeat_interval,
                                                       failure_timeout / 3))
                              if probe_timeout is None else min(failure_timeout, probe_timeout))
        self.settle = 2.5 * heartbeat_interval if settle is None else settle
        self.fence_agent = fence_agent
        self.incarnation = incarnation if incarnation is not None else new_incarnation()
        self.state = JOINING
        self.view = View(0, frozenset({self.node_id}), False, self.cluster_size)
        self._incs: dict[int, int] = {}
        self._view_key: Key = NO_VIEW
        self._last_quorate_key: Key = NO_VIEW   # the newest quorate view installed here
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
        self._unanswered: dict[int, int] = {}   # rounds in a row a live target missed
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

    def _quorate(self, members: frozenset[int] | set[int], expected: frozenset[int]) -> bool:
        """A strict majority of the voters; or exactly half of them, when the disk
        breaks the tie (a two-node cluster, or an even split)."""
        votes = 2 * len(set(members) & expected)
        if votes != len(expected) or self.disk is None or not members:
            return votes > len(expected)
        return self._wins_tie(frozenset(members), expected)

    def _wins_tie(self, members: frozenset[int], expected: frozenset[int]) -> bool:
        """The quorum-disk tiebreak. Of the voters alive anywhere (ours through the
        network, the others' heartbeats still changing on the disk), the half holding
        the lowest id wins. Both halves see the same disk, so at most one wins: the
        other half sees our heartbeats as long as we write them, and we stop counting
        ourselves the winner (own_ok) before they could take us for dead. A node that
        died stops changing its block: after the failure timeout the survivor's half
        is the only one alive, and it wins (then fences the dead one as always)."""
        assert self.disk is not None
        if not self.disk.own_ok():
            return False
        alive = members | (self.disk.alive() & expected)
        return min(alive) in members

    def _left_cleanly(self, n: int) -> bool:
        """Member n's incarnation in our view announced a clean leave."""
        p = self._peers.get(n)
        return p is not None and p.state == LEAVING and p.inc == self._incs.get(n)

    def _heartbeat_body(self) -> dict[str, Any]:
        return {"inc": self.incarnation, "st": self.state, "gen": self.view.generation,
                "m": sorted(self.view.members) if self.state == MEMBER else [],
                "q": self.view.quorate and self.state == MEMBER}

    async def _send(self, dest: int, mtype: int, body: Any) -> bool:
        try:
            await self.endpoint.send(dest, mtype, body)
            return True
        except PeerUnreachable:
            return False

    def _mark_failover(self, silent: bool) -> None:
        """Tell clusterfs.failover whether this node is on the failover path (`silent`: a
        member of its view is): a member silent, a view without one promised, or a
        removed node waiting to be fenced. Its journal recovery marks the rest."""
        if self.state == MEMBER and (silent or self._pending_fence
                                     or self._promises_a_departure()):
            failover.enter("membership")
        else:
            failover.leave("membership")

    def _promises_a_departure(self) -> bool:
        """We promised (or propose) a view that leaves a member of ours out, other
        than one that left cleanly."""
        b = self._promised_body
        if b is None or self._promised[0] <= self.view.generation:
            return False
        kept = {int(n) for n in b["members"]} | {int(n) for n in b.get("clean", {})}
        return bool(self.view.members - kept)

    def _publish(self, ev: Event) -> None:
        self.events.append(ev)
        for s in list(self._subscribers):
            try:
                s.send_nowait(ev)
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                self._subscribers.remove(s)
        self._changed.set()
        self._changed = trio.Event()
