"""Tier 2: many membership services in one trio run over the in-memory transport,
in virtual time (trio MockClock), with kills, cuts, heals and restarts."""

from __future__ import annotations

import functools
import random
from collections.abc import Callable

import pytest
import trio
import trio.testing

from clusterfs.comms.interface import Envelope
from clusterfs.comms.memory import MemoryNetwork
from clusterfs.errors import Expelled, PeerUnreachable
from clusterfs.fence.agent import NoopAgent
from clusterfs.membership.generation_record import MemoryGenerationRecord
from clusterfs.membership.service import EXPELLED, MEMBER, MembershipService
from clusterfs.membership.state import BEHIND
from clusterfs.membership.view import ExpelledEvent, Fenced, View, ViewChange
from clusterfs.wire.types import MsgType

INTERVAL = 0.5
TIMEOUT = 3.0
DETECT = TIMEOUT + 3 * INTERVAL      # detection + one proposal round, with slack


def mock_trio(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        clock = trio.testing.MockClock(autojump_threshold=0)
        return trio.run(functools.partial(fn, *args, **kwargs), clock=clock)
    return wrapper


class JitterEndpoint:
    """Wraps an endpoint: every message waits a random delay (order per peer kept);
    with `loss`, that fraction of messages is lost on the way."""

    def __init__(self, inner, jitter: float, rng: random.Random, loss: float = 0.0) -> None:
        self.inner = inner
        self.node_id = inner.node_id
        self.generation = 0
        self.jitter = jitter
        self.loss = loss
        self.rng = rng
        self.queues: dict[int, trio.MemorySendChannel] = {}
        self.pending: list = []
        self._nursery = None

    def register(self, mtypes, handler) -> None:
        self.inner.register(mtypes, handler)

    def refused_at(self, dest: int) -> float | None:
        return self.inner.refused_at(dest)

    def on_refused(self, listener) -> None:
        self.inner.on_refused(listener)

    async def send(self, dest, mtype, body) -> None:
        if self.loss and self.rng.random() < self.loss:
            return
        if dest not in self.queues:
            s, r = trio.open_memory_channel(10_000)
            self.queues[dest] = s
            self.pending.append((dest, r))
        self.queues[dest].send_nowait((self.generation, mtype, body,
                                       trio.current_time() + self.rng.uniform(0, self.jitter)))

    async def run(self) -> None:
        async with trio.open_nursery() as n:
            while True:
                while self.pending:
                    n.start_soon(self._pump, *self.pending.pop())
                await trio.sleep(0.01)

    async def _pump(self, dest, recv) -> None:
        async for gen, mtype, body, at in recv:
            await trio.sleep_until(at)
            self.inner.generation = gen
            try:
                await self.inner.send(dest, mtype, body)
            except PeerUnreachable:
                pass


class Sim:
    """A cluster of MembershipServices on one MemoryNetwork."""

    def __init__(self, net: MemoryNetwork, nursery: trio.Nursery, ids: list[int],
                 jitter: float = 0.0, seed: int = 0, loss: float = 0.0) -> None:
        self.jitter = jitter
        self.loss = loss
        self.rng = random.Random(seed)
        self.net = net
        self.nursery = nursery
        self.ids = ids
        self.nodes: dict[int, MembershipService] = {}
        self.scopes: dict[int, trio.CancelScope] = {}
        self.agents: dict[int, NoopAgent] = {}
        # node id -> wraps that node's endpoint (a scripted message schedule)
        self.wrap: dict[int, Callable] = {}
        # node id -> its generation record, handed to every life of that node
        self.records: dict[int, MemoryGenerationRecord] = {}

    async def start(self, nid: int) -> MembershipService:
        ep = self.net.endpoint(nid)
        scope = trio.CancelScope()
        if self.jitter:
            ep = JitterEndpoint(ep, self.jitter, self.rng, self.loss)
        if nid in self.wrap:
            ep = self.wrap[nid](ep)
        agent = NoopAgent()
        ms = MembershipService(ep, self.ids, heartbeat_interval=INTERVAL,
                               failure_timeout=TIMEOUT, fence_agent=agent,
                               incarnation=self.rng.getrandbits(63) | 1,
                               generation_record=self.records.get(nid))

        async def run(task_status=trio.TASK_STATUS_IGNORED):
            with scope:
                async with trio.open_nursery() as n:
                    if isinstance(ep, JitterEndpoint):
                        n.start_soon(ep.run)
                    await n.start(ms.run)
                    task_status.started()

        await self.nursery.start(run)
        self.nodes[nid], self.scopes[nid], self.agents[nid] = ms, scope, agent
        return ms

    def kill(self, nid: int) -> None:
        self.net.crash(nid)
        self.scopes.pop(nid).cancel()

    def isolate(self, nid: int) -> None:
        for o in self.ids:
            if o != nid:
                self.net.cut(nid, o)

    def heal_all(self) -> None:
        self.net._cut.clear()

    def live(self, ids=None):
        return [self.nodes[i] for i in (ids if ids is not None else self.scopes)]

    async def until(self, pred, timeout: float) -> float:
        """Wait (virtual time) until pred(); return how long it took."""
        t0 = trio.current_time()
        with trio.fail_after(timeout):
            while not pred():
                await trio.sleep(0.05)
        return trio.current_time() - t0

    def agreed(self, ids, members) -> bool:
        ms = [self.nodes[i] for i in ids]
        return (all(m.state == MEMBER and m.view.members == frozenset(members) for m in ms)
                and len({m.view.generation for m in ms}) == 1)


async def with_sim(ids, body, refuse_crashed=False, **kw):
    async with MemoryNetwork(refuse_crashed=refuse_crashed).running() as net, \
            trio.open_nursery() as nursery:
        sim = Sim(net, nursery, ids, **kw)
        await body(sim)
        nursery.cancel_scope.cancel()


def view_changes(ms):
    return [e for e in ms.events if isinstance(e, ViewChange)]


def assert_generations_grow(ms):
    gens = [e.view.generation for e in view_changes(ms)]
    assert gens == sorted(set(gens)), gens


@mock_trio
async def test_three_nodes_agree_on_one_generation():
    async def body(sim):
        for i in (1, 2, 3):
            await sim.start(i)
        await sim.until(lambda: sim.agreed([1, 2, 3], {1, 2, 3}), 10)
        v = sim.nodes[1].view
        assert v.quorate and v.coordinator == 1 and v.cluster_size == 3
        # a subscriber starts with the current view
        ch = sim.nodes[2].subscribe()
        first = ch.receive_nowait()
        assert isinstance(first, ViewChange) and first.view == v
        assert await sim.nodes[3].wait_quorum() == v
        st = sim.nodes[1].statistics()
        assert st.generation == v.generation and st.coordinator == 1 and st.members == [1, 2, 3]
        assert "members [1, 2, 3]" in sim.nodes[1].dump()
    await with_sim([1, 2, 3], body)


@mock_trio
async def test_killed_node_leaves_within_timeout_then_fenced():
    async def body(sim):
        for i in (1, 2, 3):
            await sim.start(i)
        await sim.until(lambda: sim.agreed([1, 2, 3], {1, 2, 3}), 10)
        g = sim.nodes[1].view.generation
        sim.kill(3)
        took = await sim.until(lambda: sim.agreed([1, 2], {1, 2}), DETECT + 1)
        assert took <= DETECT
        assert sim.nodes[1].view.generation > g and sim.nodes[1].view.quorate
        await sim.until(lambda: all(isinstance(m.events[-1], Fenced)
                                    for m in sim.live([1, 2])), 5)
        for m in sim.live([1, 2]):
            vc, fenced = m.events[-2], m.events[-1]
            assert isinstance(vc, ViewChange) and vc.left == {3} and vc.joined == set()
            assert fenced == Fenced(vc.view.generation, frozenset({3}))
            assert_generations_grow(m)
        assert sim.agents[1].calls == [(3, sim.nodes[1].view.generation)]
        assert sim.agents[2].calls == []     # only the coordinator fences
        assert sim.nodes[1].events == sim.nodes[2].events
    await with_sim([1, 2, 3], body)


@mock_trio
async def test_a_killed_process_its_host_refuses_leaves_before_the_failure_timeout():
    """A crash the hosts report (TCP: connection refused, nothing listens at the dead
    node's address) is a death at once: the view without it comes well before any
    failure timeout could pass, the dead node is fenced. A coordinator's death too.
    (Before the refusal counted, each took the failure timeout.)"""
    async def body(sim):
        for i in (1, 2, 3, 4):
            await sim.start(i)
        await sim.until(lambda: sim.agreed([1, 2, 3, 4], {1, 2, 3, 4}), 10)
        sim.kill(4)
        took = await sim.until(lambda: sim.agreed([1, 2, 3], {1, 2, 3}), DETECT + 1)
        assert took < TIMEOUT / 2
        await sim.until(lambda: sim.agents[1].calls, 5)
        sim.kill(1)
        took = await sim.until(lambda: sim.agreed([2, 3], {2, 3}), DETECT + 1)
        assert took < TIMEOUT / 2
        await sim.start(1)                       # a new life rejoins at once
        await sim.until(lambda: sim.agreed([1, 2, 3], {1, 2, 3}), DETECT + 1)
    await with_sim([1, 2, 3, 4], body, refuse_crashed=True)


@mock_trio
async def test_a_refusal_is_acted_on_at_once_not_at_the_next_round():
    """The coordinator proposes the view without a refused member the moment the
    refusal is reported, not at its next round: killed just after a round, the node
    is out long before the next one. (Before, the refusal waited for that round:
    about a heartbeat interval.)"""
    async def body(sim):
        for i in (1, 2, 3):
            await sim.start(i)
        await sim.until(lambda: sim.agreed([1, 2, 3], {1, 2, 3}), 10)
        coordinator = sim.nodes[1]
        await trio.sleep_until(coordinator._last_tick + INTERVAL + 0.01)   # a round just ran
        sim.kill(3)
        took = await sim.until(lambda: sim.agreed([1, 2], {1, 2}), DETECT + 1)
        assert took < INTERVAL / 2, took
        await sim.until(lambda: sim.agents[1].calls, 5)
        assert sim.agents[1].calls == [(3, coordinator.view.generation)]
    await with_sim([1, 2, 3], body, refuse_crashed=True)


@mock_trio
async def test_a_silent_node_is_still_judged_by_the_failure_timeout():
    """Only a refusal shortens detection: a node cut off (or frozen, or powered off)
    refuses nothing, so it stays in the view for a whole failure timeout."""
    async def body(sim):
        for i in (1, 2, 3):
            await sim.start(i)
        await sim.until(lambda: sim.agreed([1, 2, 3], {1, 2, 3}), 10)
        sim.isolate(3)
        sim.kill(3)                              # behind a cut: no host answers for it
        took = await sim.until(lambda: sim.agreed([1, 2], {1, 2}), DETECT + 1)
        assert took >= TIMEOUT
    await with_sim([1, 2, 3], body, refuse_crashed=True)


@mock_trio
async def test_coordinator_death_is_handled():
    async def body(sim):
        for i in (1, 2, 3, 4, 5):
            await sim.start(i)
        await sim.until(lambda: sim.agreed([1, 2, 3, 4, 5], {1, 2, 3, 4, 5}), 10)
        sim.kill(1)
        took = await sim.until(lambda: sim.agreed([2, 3, 4, 5], {2, 3, 4, 5}), DETECT + 1)
        assert took <= DETECT
        assert sim.nodes[2].view.coordinator == 2
        await sim.until(lambda: sim.agents[2].calls, 5)
        assert sim.agents[2].calls[0][0] == 1
        await sim.until(lambda: all(isinstance(m.events[-1], Fenced)
                                    for m in sim.live([2, 3, 4, 5])), 5)
        evs = [m.events for m in sim.live([2, 3, 4, 5])]
        assert all(e == evs[0] for e in evs)
    await with_sim([1, 2, 3, 4, 5], body)


@mock_trio
async def test_without_quorum_wait_quorum_blocks_until_it_returns():
    async def body(sim):
        for i in (1, 2, 3):
            await sim.start(i)
        await sim.until(lambda: sim.agreed([1, 2, 3], {1, 2, 3}), 10)
        sim.kill(2)
        sim.kill(3)
        await sim.until(lambda: sim.nodes[1].view.members == {1}, DETECT + 1)
        m1 = sim.nodes[1]
        assert not m1.view.quorate
        # nobody fences without quorum
        assert sim.agents[1].calls == []
        got = []

        async def waiter():
            got.append(await m1.wait_quorum())

        sim.nursery.start_soon(waiter)
        await trio.sleep(30)
        assert got == []                     # blocked: neither granted nor failed
        await sim.start(2)                   # a fresh incarnation of node 2 comes back
        await sim.until(lambda: got, 10)
        assert got[0].quorate and got[0].members == {1, 2}
        assert sim.agreed([1, 2], {1, 2})
        # the quorate view fences node 3 (removed while there was no quorum); node 2's
        # old incarnation is not fenced: its new incarnation is a member
        await sim.until(lambda: sim.agents[1].calls, 5)
        assert [n for n, _ in sim.agents[1].calls] == [3]
        await sim.until(lambda: isinstance(m1.events[-1], Fenced), 5)
        assert m1.events[-1].nodes == {3}
    await with_sim([1, 2, 3], body)


@mock_trio
async def test_cut_off_node_is_expelled_not_merged_and_can_restart():
    async def body(sim):
        for i in (1, 2, 3):
            await sim.start(i)
        await sim.until(lambda: sim.agreed([1, 2, 3], {1, 2, 3}), 10)
        m1 = sim.nodes[1]
        sim.isolate(1)                       # cut off the coordinator itself
        await sim.until(lambda: sim.agreed([2, 3], {2, 3}), DETECT + 1)
        await sim.until(lambda: m1.view.members == {1} and not m1.view.quorate, DETECT + 1)
        majority_gen = sim.nodes[2].view.generation
        sim.heal_all()
        await sim.until(lambda: m1.state == EXPELLED, 5)
        assert isinstance(m1.events[-1], ExpelledEvent)
        with pytest.raises(Expelled):
            await m1.wait_quorum()
        await trio.sleep(10)                 # and it stays out: never merged back
        assert sim.agreed([2, 3], {2, 3})
        assert sim.nodes[2].view.generation == majority_gen
        # a clean restart (fresh incarnation) of node 1 rejoins
        sim.kill(1)
        await sim.start(1)
        await sim.until(lambda: sim.agreed([1, 2, 3], {1, 2, 3}), DETECT + 5)
        assert sim.nodes[1].view.generation > majority_gen
        assert sim.nodes[2].events == sim.nodes[3].events
        assert sim.nodes[1].state == MEMBER
    await with_sim([1, 2, 3], body)


@mock_trio
async def test_restarted_node_is_told_apart_from_its_old_incarnation():
    async def body(sim):
        for i in (1, 2, 3):
            await sim.start(i)
        await sim.until(lambda: sim.agreed([1, 2, 3], {1, 2, 3}), 10)
        old = sim.nodes[3].incarnation
        sim.kill(3)
        await sim.start(3)                   # back before the failure timeout expires
        assert sim.nodes[3].incarnation != old
        await sim.until(lambda: sim.agreed([1, 2, 3], {1, 2, 3})
                        and sim.nodes[3].view.generation > 2, DETECT + 5)
        # the old incarnation was removed (and fenced) before the new one joined
        changes = view_changes(sim.nodes[1])
        assert any(c.left == {3} for c in changes)
        assert changes[-1].joined == {3}
        assert sim.agents[1].calls and sim.agents[1].calls[0][0] == 3
    await with_sim([1, 2, 3], body)


@mock_trio
async def test_same_events_in_same_order_through_churn():
    ids = [1, 2, 3, 4, 5]

    async def body(sim):
        subs = {}
        for i in ids:
            await sim.start(i)
            subs[i] = sim.nodes[i].subscribe()
        await sim.until(lambda: sim.agreed(ids, set(ids)), 10)
        sim.kill(4)
        await sim.until(lambda: sim.agreed([1, 2, 3, 5], {1, 2, 3, 5}), DETECT + 1)
        sim.kill(2)
        await sim.until(lambda: sim.agreed([1, 3, 5], {1, 3, 5}), DETECT + 1)
        await sim.start(4)
        await sim.until(lambda: sim.agreed([1, 3, 4, 5], {1, 3, 4, 5}), DETECT + 5)
        await trio.sleep(5)
        seqs = {i: sim.nodes[i].events for i in (1, 3, 5)}
        assert seqs[1] == seqs[3] == seqs[5]
        for i in (1, 3, 5):
            assert_generations_grow(sim.nodes[i])
            # the subscription carried exactly the same sequence
            got = []
            while True:
                try:
                    got.append(subs[i].receive_nowait())
                except trio.WouldBlock:
                    break
            assert got == seqs[i]
            # every Fenced comes right after... at least after its ViewChange
            for k, e in enumerate(seqs[i]):
                if isinstance(e, Fenced):
                    prior = [x for x in seqs[i][:k] if isinstance(x, ViewChange)]
                    assert prior[-1].view.generation == e.generation
        left = [c.left for c in view_changes(sim.nodes[1]) if c.left]
        assert left == [{4}, {2}]
        assert [c.joined for c in view_changes(sim.nodes[1])][-1] == {4}
    await with_sim(ids, body)


@mock_trio
async def test_non_quorate_partitions_merge_back_without_expulsion():
    ids = [1, 2, 3, 4]

    async def body(sim):
        for i in ids:
            await sim.start(i)
        await sim.until(lambda: sim.agreed(ids, set(ids)), 10)
        for a in (1, 2):                     # 2-2 split: neither half has quorum
            for b in (3, 4):
                sim.net.cut(a, b)
        await sim.until(lambda: sim.agreed([1, 2], {1, 2}) and sim.agreed([3, 4], {3, 4}),
                        DETECT + 1)
        assert not sim.nodes[1].view.quorate and not sim.nodes[3].view.quorate
        assert all(a.calls == [] for a in sim.agents.values())     # nobody fenced
        sim.heal_all()
        await sim.until(lambda: sim.agreed(ids, set(ids)), DETECT + 5)
        assert sim.nodes[1].view.quorate
        assert not any(isinstance(e, ExpelledEvent) for m in sim.live() for e in m.events)
        assert all(a.calls == [] for a in sim.agents.values())
        for m in sim.live():
            assert_generations_grow(m)
    await with_sim(ids, body)


@mock_trio
async def test_a_member_merged_back_is_not_proposed_out_again_on_an_old_suspicion():
    """Node 1 suspects node 2 (a proposal round it did not answer in time: a SIGSTOP,
    a stall) as node 3 dies, so node 1 goes on alone without quorum. Node 2, still
    in the quorate view, merges node 1 back. Node 1 then coordinates the merged view
    and must not propose node 2 out again because of the suspicion from before the
    merge (on real mounts: views with and without node 2 alternating until the
    suspicion ran out, each one a DLM recovery; tests/test_cluster_quorum.py)."""
    ids = [1, 2, 3]

    async def body(sim):
        for i in ids:
            await sim.start(i)
        await sim.until(lambda: sim.agreed(ids, set(ids)), 10)
        sim.nodes[1]._suspect_until[2] = trio.current_time() + 10 * TIMEOUT
        sim.kill(3)
        await sim.until(lambda: sim.agreed([1, 2], {1, 2}), 2 * DETECT)
        settled = sim.nodes[1].view.generation
        await trio.sleep(3 * DETECT)
        assert sim.agreed([1, 2], {1, 2})
        flapped = [c.view.members for c in view_changes(sim.nodes[1])
                   if c.view.generation > settled]
        assert flapped == [], f"node 1 installed {flapped} after the merge"
    await with_sim(ids, body)


@mock_trio
async def test_a_node_that_missed_a_quorate_view_holding_it_answers_behind_not_ahead():
    """Node 3 was in quorate view 58; view 59 (quorate, holding it) was decided without
    its answer arriving in time, and meanwhile it went on alone without quorum (view
    60). A proposal built on 59 that merges it back cannot be followed (its history
    leads from 58, not 59): it must answer "behind", so the coordinator leaves it out
    and it restarts clean. Answered "ahead", the coordinator asked it again for ever
    (the churn test with message jitter: no view for 60 s)."""
    async with MemoryNetwork().running() as net:
        ms = MembershipService(net.endpoint(3), [1, 2, 3, 4, 5], heartbeat_interval=INTERVAL,
                               failure_timeout=TIMEOUT, fence_agent=NoopAgent(),
                               incarnation=33)
        ms.state = MEMBER
        ms.view = View(60, frozenset({3}), False, 5)
        ms._view_key = (60, 3, 33)
        ms._last_quorate_key = (58, 2, 22)
        ms._promised = (60, 3, 33)
        answers = []

        async def send(dest, mtype, body):
            answers.append(body)

        ms._send = send
        await ms._on_propose(Envelope(2, 59, int(MsgType.VIEW_PROPOSE), {
            "gen": 62, "coord": 2, "cinc": 22, "members": {2: 22, 3: 33, 4: 44},
            "base": [2, 3, 4], "bkey": [59, 2, 22], "merged": {3: 33}}))
        assert [(a["ok"], a["why"]) for a in answers] == [(False, BEHIND)]


@mock_trio
async def test_everyone_isolated_then_healed_forms_one_view():
    ids = [1, 2, 3]

    async def body(sim):
        for i in ids:
            await sim.start(i)
        await sim.until(lambda: sim.agreed(ids, set(ids)), 10)
        for i in ids:
            sim.isolate(i)
        await sim.until(lambda: all(sim.nodes[i].view.members == {i} for i in ids),
                        DETECT + 1)
        sim.heal_all()
        await sim.until(lambda: sim.agreed(ids, set(ids)), DETECT + 5)
        assert sim.nodes[2].view.quorate
    await with_sim(ids, body)


@mock_trio
async def test_malformed_bodies_from_a_peer_are_ignored():
    async def body(sim):
        for i in (1, 2, 3):
            await sim.start(i)
        await sim.until(lambda: sim.agreed([1, 2, 3], {1, 2, 3}), 10)
        g = sim.nodes[1].view.generation
        ep3 = sim.net.endpoints[3]
        for t in (MsgType.HEARTBEAT, MsgType.VIEW_PROPOSE, MsgType.VIEW_ACK,
                  MsgType.VIEW_COMMIT, MsgType.FENCE_DONE, MsgType.EXPELLED):
            for junk in (None, "x", {"gen": "nope"}, {"inc": 1}, ()):
                await ep3.send(1, t, junk)
        await trio.sleep(5)
        assert sim.agreed([1, 2, 3], {1, 2, 3}) and sim.nodes[1].view.generation == g
    await with_sim([1, 2, 3], body)


@mock_trio
async def test_asymmetric_cut_competing_coordinators_never_fence_a_member():
    """1 and 2 cannot talk; both still reach 3. Both think they coordinate."""
    ids = [1, 2, 3]

    async def body(sim):
        for i in ids:
            await sim.start(i)
        await sim.until(lambda: sim.agreed(ids, set(ids)), 10)
        sim.net.cut(1, 2)

        def settled():
            live = [m for m in sim.live() if m.state == MEMBER]
            return (len(live) >= 2 and len({(m.view.generation, m.view.members)
                                            for m in live}) == 1
                    and live[0].view.members == {m.node_id for m in live})
        await sim.until(settled, 60)
        await trio.sleep(10)
        assert settled()
        final = next(m for m in sim.live() if m.state == MEMBER).view
        assert final.quorate
        for a in sim.agents.values():
            for node, _gen in a.calls:
                assert node not in final.members
        for m in sim.live():
            for e in m.events:
                if isinstance(e, Fenced):
                    vc = [x for x in m.events if isinstance(x, ViewChange)
                          and x.view.generation == e.generation][-1]
                    assert not (e.nodes & vc.view.members)
    await with_sim(ids, body)


@mock_trio
async def test_a_service_stopped_while_a_member_is_silent_leaves_the_failover_path():
    """The failover path's phases are process-wide flags: a membership service that
    stops (its mount ending) while it sees a member silent must not leave its phase
    marked for whatever runs in the process next (an in-process test, the stall
    watcher, which reads /proc only outside the path)."""
    from clusterfs import failover

    async def body(sim):
        for i in (1, 2, 3):
            await sim.start(i)
        await sim.until(lambda: sim.agreed([1, 2, 3], {1, 2, 3}), 10)
        sim.kill(3)
        await sim.until(lambda: "membership" in failover.under_way(), DETECT)
        sim.kill(1)
        sim.kill(2)
        await trio.sleep(INTERVAL)
        assert "membership" not in failover.under_way()
    await with_sim([1, 2, 3], body)
