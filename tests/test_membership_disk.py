"""Tier 2: the disk as membership's second path (a fake DiskPath over the in-memory
transport, virtual time).

The quorum-disk tiebreak: a half of the voters is quorate if the lowest id alive
anywhere (network or disk) is in it, and only while its own disk heartbeat is fresh. A
joining node forms no view of its own while a quorate member beats on the disk out of
its network's sight (what closes the restart hazard of a downscaled cluster).
"""

from __future__ import annotations

import trio
from test_membership import TIMEOUT, mock_trio, with_sim

from clusterfs.membership.service import JOINING, MEMBER

DETECT = TIMEOUT + 3


class FakeDisk:
    """What every node's disk heartbeat would show: `beating` are the nodes whose
    blocks still change (the test decides); quorate flags come from their services."""

    def __init__(self, sim, beating: set[int]) -> None:
        self.sim = sim
        self.beating = beating

    def view_of(self, me: int) -> _NodeDisk:
        return _NodeDisk(self, me)


class _NodeDisk:
    def __init__(self, disk: FakeDisk, me: int) -> None:
        self.disk, self.me = disk, me

    def alive(self) -> frozenset[int]:
        return frozenset(self.disk.beating - {self.me})

    def quorate_members(self) -> frozenset[int]:
        nodes = self.disk.sim.nodes
        return frozenset(n for n in self.alive() if n in nodes
                         and nodes[n].state == MEMBER and nodes[n].view.quorate)

    def own_ok(self) -> bool:
        return self.me in self.disk.beating


async def start_all(sim, disk: FakeDisk, ids) -> None:
    for i in ids:
        ms = await sim.start(i)
        ms.disk = disk.view_of(i)


@mock_trio
async def test_the_survivor_of_two_is_quorate_once_the_dead_ones_disk_beat_stops():
    async def body(sim):
        disk = FakeDisk(sim, {1, 2})
        await start_all(sim, disk, (1, 2))
        await sim.until(lambda: sim.agreed([1, 2], {1, 2}), 10)
        sim.kill(1)            # the lowest id dies; its block still looks fresh for a while
        await sim.until(lambda: sim.nodes[2].view.members == {2}, DETECT)
        assert not sim.nodes[2].view.quorate         # node 1 may still be alive
        await trio.sleep(2 * TIMEOUT)
        assert not sim.nodes[2].view.quorate
        disk.beating.discard(1)                      # its heartbeat stopped changing
        await sim.until(lambda: sim.nodes[2].view.quorate, DETECT)
        await sim.until(lambda: sim.agents[2].calls, 5)
        assert sim.agents[2].calls[0][0] == 1        # and then it is fenced
    await with_sim([1, 2], body)


@mock_trio
async def test_a_two_node_split_leaves_exactly_one_side_quorate():
    async def body(sim):
        disk = FakeDisk(sim, {1, 2})
        await start_all(sim, disk, (1, 2))
        await sim.until(lambda: sim.agreed([1, 2], {1, 2}), 10)
        sim.isolate(2)                               # network cut; both see the disk
        await sim.until(lambda: all(len(sim.nodes[n].view.members) == 1 for n in (1, 2)),
                        DETECT)
        await trio.sleep(2 * TIMEOUT)
        assert sim.nodes[1].view.quorate and not sim.nodes[2].view.quorate
        assert [c[0] for c in sim.agents[1].calls] == [2] and sim.agents[2].calls == []
        # the winner stops counting itself the winner when it cannot write its beat
        disk.beating.discard(1)
        await sim.until(lambda: not sim.nodes[1].view.quorate, DETECT)
        # and the other side, seeing node 1's heartbeat stopped, takes over
        await sim.until(lambda: sim.nodes[2].view.quorate, DETECT)
    await with_sim([1, 2], body)


@mock_trio
async def test_restarted_nodes_do_not_form_a_view_beside_a_downscaled_cluster():
    """3 and 2 leave cleanly (voters {1}); they restart while cut off from 1 on the
    network: without the disk they would count three voters and form a quorate {2, 3}."""
    async def body(sim):
        disk = FakeDisk(sim, {1, 2, 3})
        await start_all(sim, disk, (1, 2, 3))
        await sim.until(lambda: sim.agreed([1, 2, 3], {1, 2, 3}), 10)
        for n in (3, 2):
            assert await sim.nodes[n].leave(timeout=2 * TIMEOUT)
            sim.kill(n)
            disk.beating.discard(n)
        await sim.until(lambda: sim.agreed([1], {1}) and sim.nodes[1].view.quorate, 10)
        sim.isolate(1)
        await start_all(sim, disk, (2, 3))
        disk.beating |= {2, 3}
        await trio.sleep(4 * TIMEOUT)
        assert sim.nodes[2].state == JOINING and sim.nodes[3].state == JOINING
        assert sim.nodes[1].view.quorate and sim.nodes[1].view.members == {1}
        sim.heal_all()                               # back in sight: admitted normally
        await sim.until(lambda: sim.agreed([1, 2, 3], {1, 2, 3}), 10)
    await with_sim([1, 2, 3], body)


@mock_trio
async def test_without_a_disk_path_the_survivor_of_two_waits():
    async def body(sim):
        for i in (1, 2):
            await sim.start(i)
        await sim.until(lambda: sim.agreed([1, 2], {1, 2}), 10)
        sim.kill(1)
        await sim.until(lambda: sim.nodes[2].view.members == {2}, DETECT)
        await trio.sleep(3 * TIMEOUT)
        assert not sim.nodes[2].view.quorate
    await with_sim([1, 2], body)
