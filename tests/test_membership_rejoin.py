"""Tier 2: the lowest id (the coordinator) is killed and restarted; the restarted
node becomes coordinator again and must not remove live members it simply has
not heard from yet (over TCP, peers' reconnects to a restarted node can lag
behind the restarted node's own heartbeats, so the others admit it before it
hears them all). Also: a coordinator whose own loop stalls must not take the
heartbeats waiting for it as its peers' silence."""

from __future__ import annotations

import pytest
import trio
from test_membership import INTERVAL, TIMEOUT, Sim, mock_trio

from clusterfs.comms.memory import MemoryNetwork
from clusterfs.membership.service import EXPELLED
from clusterfs.membership.view import ExpelledEvent, ViewChange

IDS = [1, 2, 3, 4, 5]


class OneWayNetwork(MemoryNetwork):
    """A MemoryNetwork that can also drop one direction of a link (a -> b)."""

    def __init__(self) -> None:
        super().__init__()
        self.dropped: set[tuple[int, int]] = set()

    def linked(self, a: int, b: int) -> bool:
        return super().linked(a, b) and (a, b) not in self.dropped


def never_expelled_live(sim: Sim, live: list[int]) -> None:
    for n in live:
        m = sim.nodes[n]
        assert m.state != EXPELLED, f"live node {n} was expelled"
        assert not any(isinstance(e, ExpelledEvent) for e in m.events), n
        for o in IDS:
            for e in sim.nodes[o].events if o in sim.scopes else []:
                # once the restarted coordinator joined, no view may drop a live node
                if isinstance(e, ViewChange) and e.view.generation > sim.joined_gen:
                    assert n in e.view.members or n == o, (
                        f"node {o}: view {e.view.generation} {sorted(e.view.members)} "
                        f"dropped live node {n}")


async def run_rounds(rounds: int, lag: float) -> None:
    net = OneWayNetwork()
    async with net.running(), trio.open_nursery() as nursery:
        sim = Sim(net, nursery, IDS, seed=7)
        sim.joined_gen = 10**9
        for i in IDS:
            await sim.start(i)
        with trio.fail_after(20):
            while not sim.agreed(IDS, IDS):
                await trio.sleep(0.05)
        for _ in range(rounds):
            sim.kill(1)
            with trio.fail_after(TIMEOUT + 10):
                while not sim.agreed([2, 3, 4, 5], [2, 3, 4, 5]):
                    await trio.sleep(0.05)
            # the restarted node 1 does not hear 3 and 5 for `lag` seconds (their
            # reconnect backoff), while 2 and 4 hear it and admit it
            net.dropped |= {(3, 1), (5, 1)}
            await sim.start(1)
            t0 = trio.current_time()
            with trio.fail_after(TIMEOUT + 10):
                while not sim.agreed([1, 2, 4], IDS):
                    await trio.sleep(0.01)
            sim.joined_gen = sim.nodes[1].view.generation - 1
            assert sim.nodes[1].view.coordinator == 1
            await trio.sleep_until(t0 + lag)
            net.dropped.clear()
            # a few failure timeouts later: nobody live was removed or expelled
            await trio.sleep(3 * TIMEOUT)
            never_expelled_live(sim, IDS[1:])
            assert sim.agreed(IDS, IDS), [(n.node_id, n.view) for n in sim.live()]
            sim.joined_gen = 10**9
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("lag", [INTERVAL, TIMEOUT / 2, TIMEOUT - INTERVAL])
@mock_trio
async def test_restarted_coordinator_does_not_remove_members_it_has_not_heard_yet(lag):
    await run_rounds(3, lag)


@mock_trio
async def test_a_stall_of_our_own_loop_is_not_peers_silence():
    """The whole machine pauses (VM pause, SIGSTOP of everything, a swap storm)
    longer than the failure timeout: on waking, every node's loop runs before the
    heartbeats waiting in its inbox are read; nobody may take that for death."""
    async with MemoryNetwork().running() as net, trio.open_nursery() as nursery:
        sim = Sim(net, nursery, [1, 2, 3])
        for i in (1, 2, 3):
            await sim.start(i)
        with trio.fail_after(20):
            while not sim.agreed([1, 2, 3], [1, 2, 3]):
                await trio.sleep(0.05)
        gen = sim.nodes[1].view.generation
        for pause in (TIMEOUT + INTERVAL, 2 * TIMEOUT, 10 * TIMEOUT):
            await trio.sleep(INTERVAL / 3)
            trio.lowlevel.current_clock().jump(pause)
            await trio.sleep(3 * TIMEOUT)
            assert sim.agreed([1, 2, 3], [1, 2, 3])
            assert all(m.view.generation == gen and m.proposals_failed == 0
                       for m in sim.live()), [m.dump() for m in sim.live()]
        nursery.cancel_scope.cancel()
