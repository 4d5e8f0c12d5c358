"""Tier 2: a suspicion from above (the proxy's I/O to a block server timed out) makes
membership probe that node at once (clusterfs/membership/detection.py), in virtual
time over the in-memory transport (the Sim of test_membership.py)."""

from __future__ import annotations

import trio
from test_membership import INTERVAL, TIMEOUT, mock_trio, with_sim

from clusterfs.membership.view import ViewChange


async def start_three(sim) -> None:
    for i in (1, 2, 3):
        await sim.start(i)
    await sim.until(lambda: sim.agreed([1, 2, 3], {1, 2, 3}), 10)


@mock_trio
async def test_a_suspected_silent_coordinator_is_removed_before_the_failure_timeout():
    """Node 1 (the coordinator) goes silent; node 3's I/O notices half a second later
    and suspects it: nodes 2 and 3 probe it, and node 2 removes it as soon as the
    probe is unanswered, well before 1's heartbeats would have been missed for
    failure_timeout."""
    async def body(sim):
        await start_three(sim)
        sim.isolate(1)
        await trio.sleep(INTERVAL)                 # the proxy's io_timeout
        sim.nodes[3].suspect(1)
        took = await sim.until(lambda: sim.agreed([2, 3], {2, 3}), TIMEOUT * 3)
        probe = sim.nodes[3].probe_timeout
        print(f"removed {INTERVAL + took:.2f} s after the cut (probe {probe} s, "
              f"failure timeout {TIMEOUT} s)")
        assert INTERVAL + took < TIMEOUT
        assert sim.nodes[2].probes == 1 and sim.nodes[3].probes == 1
        left = [e.left for e in sim.nodes[2].events if isinstance(e, ViewChange)][-1]
        assert left == {1}
    await with_sim([1, 2, 3], body)


@mock_trio
async def test_a_suspected_node_that_answers_stays():
    async def body(sim):
        await start_three(sim)
        g = sim.nodes[1].view.generation
        sim.nodes[3].suspect(2)
        sim.nodes[3].suspect(2)                    # one probe at a time
        await trio.sleep(2 * TIMEOUT)
        assert sim.agreed([1, 2, 3], {1, 2, 3}) and sim.nodes[1].view.generation == g
        assert sim.nodes[3].probes == 1 and sim.nodes[1].probes == 1
        assert sim.nodes[2].probes == 0
        assert sim.nodes[3]._probed == {}           # the answer cleared the suspicion
    await with_sim([1, 2, 3], body)


@mock_trio
async def test_suspecting_a_non_member_or_itself_does_nothing():
    async def body(sim):
        await start_three(sim)
        sim.nodes[3].suspect(3)
        sim.nodes[3].suspect(7)
        assert sim.nodes[3].probes == 0
    await with_sim([1, 2, 3], body)
