"""Tier 2: a clean leave (membership.leave) on the in-memory transport, virtual time.

A member that leaves cleanly is removed in a new view at once (not after the failure
timeout), is never fenced, is named in ViewChange.clean, and its vote goes: with three
nodes, after two clean leaves the last one is still quorate. A failure never shrinks
the voters. A node that left may start again and rejoin, with its vote back.
"""

from __future__ import annotations

import trio
from test_membership import INTERVAL, TIMEOUT, mock_trio, with_sim

from clusterfs.membership.service import LEAVING, MEMBER
from clusterfs.membership.view import Fenced, ViewChange

QUICK = TIMEOUT / 2        # a leave must be handled well before a death would be


async def _leave(sim, nid: int) -> bool:
    """Node nid leaves; returns what leave() said; then it is gone (process exit)."""
    ok = await sim.nodes[nid].leave(timeout=2 * TIMEOUT)
    sim.kill(nid)
    return ok


@mock_trio
async def test_a_clean_leave_is_quick_unfenced_and_the_last_node_stays_quorate():
    async def body(sim):
        for i in (1, 2, 3):
            await sim.start(i)
        await sim.until(lambda: sim.agreed([1, 2, 3], {1, 2, 3}), 10)
        t0 = trio.current_time()
        assert await _leave(sim, 3)
        assert trio.current_time() - t0 < QUICK
        await sim.until(lambda: sim.agreed([1, 2], {1, 2}), QUICK)
        v = sim.nodes[1].view
        assert v.quorate and v.expected == {1, 2}
        last = [e for e in sim.nodes[1].events if isinstance(e, ViewChange)][-1]
        assert last.left == {3} and last.clean == {3}
        assert await _leave(sim, 1)              # the coordinator leaves too
        await sim.until(lambda: sim.agreed([2], {2}), QUICK)
        v = sim.nodes[2].view
        assert v.quorate and v.expected == {2} and v.coordinator == 2
        await trio.sleep(3 * TIMEOUT)            # nothing more happens: no fence, no view
        assert sim.nodes[2].view == v
        for n in (1, 2):
            assert sim.agents[n].calls == []
            assert not any(isinstance(e, Fenced) for e in sim.nodes[n].events)
        # the nodes that left start again (new lives) and rejoin; the votes come back
        await sim.start(1)
        await sim.start(3)
        await sim.until(lambda: sim.agreed([1, 2, 3], {1, 2, 3}), 10)
        assert sim.nodes[1].view.expected == {1, 2, 3} and sim.nodes[1].view.quorate
    await with_sim([1, 2, 3], body)


@mock_trio
async def test_a_failure_after_a_leave_keeps_the_failed_nodes_vote():
    """3 leaves cleanly, 2 dies: 1 is alone with voters {1, 2}: no quorum (2 may come
    back with 3 and count as a majority of the configured nodes)."""
    async def body(sim):
        for i in (1, 2, 3):
            await sim.start(i)
        await sim.until(lambda: sim.agreed([1, 2, 3], {1, 2, 3}), 10)
        assert await _leave(sim, 3)
        await sim.until(lambda: sim.agreed([1, 2], {1, 2}), QUICK)
        sim.kill(2)
        await sim.until(lambda: sim.nodes[1].view.members == {1}, 2 * TIMEOUT)
        v = sim.nodes[1].view
        assert not v.quorate and v.expected == {1, 2}
        assert sim.agents[1].calls == []         # a view without quorum fences nobody
    await with_sim([1, 2, 3], body)


@mock_trio
async def test_a_leaving_node_refuses_proposals_and_takes_part_in_no_view():
    async def body(sim):
        for i in (1, 2, 3):
            await sim.start(i)
        await sim.until(lambda: sim.agreed([1, 2, 3], {1, 2, 3}), 10)
        g = sim.nodes[3].view.generation
        leaving = sim.nodes[3]
        async with trio.open_nursery() as n:
            n.start_soon(leaving.leave, 2 * TIMEOUT)
            await sim.until(lambda: sim.agreed([1, 2], {1, 2}), QUICK)
        assert leaving.state == LEAVING and leaving.view.generation == g
        # it stays up (a slow exit): nobody fences it or expels it, no view takes it back
        await trio.sleep(3 * TIMEOUT)
        assert sim.agreed([1, 2], {1, 2}) and leaving.state == LEAVING
        assert sim.agents[1].calls == [] and sim.nodes[1].expelled_sent == 0
        assert all(m.state == MEMBER for m in sim.live([1, 2]))
    await with_sim([1, 2, 3], body)


@mock_trio
async def test_a_lone_member_leaves_at_once():
    async def body(sim):
        await sim.start(1)
        await sim.until(lambda: sim.nodes[1].state == MEMBER, 10)
        t0 = trio.current_time()
        assert await sim.nodes[1].leave(timeout=10)
        assert trio.current_time() - t0 < INTERVAL
    await with_sim([1], body)


@mock_trio
async def test_members_leaving_all_at_once_do_not_wait_for_one_another():
    """Every member leaving together (devcluster down, a whole-cluster shutdown): no one
    is left to install a view without the others, and none need be (each leaves with
    its journal clean and no lock held), so each is done once every other member is
    leaving too, instead of waiting out its timeout and warning."""
    async def body(sim):
        for i in (1, 2, 3):
            await sim.start(i)
        await sim.until(lambda: sim.agreed([1, 2, 3], {1, 2, 3}), 10)
        said: dict[int, bool] = {}
        t0 = trio.current_time()

        async def leave(nid: int) -> None:
            said[nid] = await sim.nodes[nid].leave(timeout=2 * TIMEOUT)

        async with trio.open_nursery() as nursery:
            for nid in (1, 2, 3):
                nursery.start_soon(leave, nid)
        assert said == {1: True, 2: True, 3: True}
        assert trio.current_time() - t0 < QUICK
        for n in (1, 2, 3):
            assert sim.agents[n].calls == []
    await with_sim([1, 2, 3], body)
