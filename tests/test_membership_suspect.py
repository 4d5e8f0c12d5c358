"""Tier 2: a suspicion from above (the proxy's I/O to a block server timed out) makes
membership probe that node at once (clusterfs/membership/detection.py), in virtual
time over the in-memory transport (the Sim of test_membership.py)."""

from __future__ import annotations

from dataclasses import dataclass

import trio
from test_membership import INTERVAL, TIMEOUT, mock_trio, with_sim

from clusterfs.comms.beacon import Ages
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


# -- a suspicion with `quiet` (the proxy's: node/storagegroup.py) -----------------------

def _suspect_a_slow_node(quiet: float | None) -> list[int]:
    """Node 3 suspects node 2, which answers its I/O late again and again (every 0.3 s
    another request owed its answer for 0.5 s) while its heartbeats arrive (5 ms of
    jitter on every message): the probes each node sent, the suspicions node 3 left."""
    out: list[int] = []

    @mock_trio
    async def run():
        async def body(sim):
            await start_three(sim)
            g = sim.nodes[1].view.generation
            for _ in range(20):
                sim.nodes[3].suspect(2, "block I/O not answered for 0.5 s", quiet=quiet)
                await trio.sleep(0.3)
            await trio.sleep(2 * INTERVAL)
            assert sim.agreed([1, 2, 3], {1, 2, 3}) and sim.nodes[1].view.generation == g
            assert sim.nodes[3].statistics().suspicions_heard == sim.nodes[3].suspicions_heard
            out.extend([*(sim.nodes[n].probes for n in (1, 2, 3)),
                        sim.nodes[3].suspicions_heard])
        await with_sim([1, 2, 3], body, jitter=0.005)

    run()
    return out


def test_a_slow_node_still_heard_from_is_not_probed():
    """With `quiet` (the proxy's rule, as the DLM's), a node heard from within the time
    it owed its answer is alive, so it is never probed; without it (the proxy before),
    every suspicion probed it - answered each time, it stayed, after two info lines on
    each member but the suspect."""
    *probes, spared = _suspect_a_slow_node(INTERVAL)
    assert probes == [0, 0, 0] and spared >= 5, (probes, spared)   # one look at a time
    *probes, spared = _suspect_a_slow_node(None)
    assert probes[0] >= 10 and probes[2] >= 10 and spared == 0, (probes, spared)


@mock_trio
async def test_quiet_delays_no_probe_of_a_stopped_node():
    """The node stops (its heartbeats with it) before the I/O it then owes: by the time
    the answer is overdue it has been silent at least that long, so it is probed at
    once, as without `quiet`. An I/O sent just before the stop: the probe follows once
    the node has been silent that long, never later than its wait after the stop."""
    async def body(sim):
        await start_three(sim)
        sim.isolate(1)
        await trio.sleep(INTERVAL)                  # the proxy's wait, sent at the stop
        assert sim.nodes[3].silent_for(1) >= INTERVAL
        sim.nodes[3].suspect(1, "block I/O not answered for 0.5 s", quiet=INTERVAL)
        assert sim.nodes[3].probes == 1             # at once
        took = await sim.until(lambda: sim.agreed([2, 3], {2, 3}), TIMEOUT * 3)
        assert INTERVAL + took < TIMEOUT
    await with_sim([1, 2, 3], body)


@mock_trio
async def test_an_answer_owed_from_before_the_stop_is_probed_once_silent_that_long():
    async def body(sim):
        await start_three(sim)
        await trio.sleep(0.2)                       # some time after a heartbeat
        sim.isolate(1)
        stopped = trio.current_time()
        await trio.sleep(0.1)               # the I/O was sent 0.4 s before the stop
        sim.nodes[3].suspect(1, "block I/O not answered for 0.5 s", quiet=INTERVAL)
        await sim.until(lambda: sim.nodes[3].probes == 1, 2)
        probed = trio.current_time() - stopped
        assert probed <= 1.5 * INTERVAL + 0.06, probed
        assert sim.nodes[3].silent_for(1) >= INTERVAL - 0.06
        await sim.until(lambda: sim.agreed([2, 3], {2, 3}), TIMEOUT * 3)
    await with_sim([1, 2, 3], body)


def test_the_proxy_hands_membership_how_long_its_io_waited():
    """node/storagegroup.py: a silent block server is reprefered at once and handed to
    membership with `quiet` = how long its request waited (none for a refusal)."""
    from types import SimpleNamespace

    from clusterfs.node.storagegroup import wire_proxy

    calls: list = []
    dev = SimpleNamespace(proxied=True, route_by=lambda locate: None, prefer=None,
                          on_silent=None)
    ls = SimpleNamespace(on_preferred=None, reprefer=lambda s: calls.append(("ask", s)))
    membership = SimpleNamespace(
        suspect=lambda node, why, quiet: calls.append(("suspect", node, quiet, why)))
    sb = SimpleNamespace(journal_start=1, journal_count=1, journal_blocks=1, rgrp_count=1,
                         rgrp_start=2, rgrp_of=lambda b: 0)

    async def main():
        wire_proxy(dev, sb, ls, membership)
        dev.on_silent(2, 0.5)
        dev.on_silent(1, 0.0)
        await trio.sleep(0)

    trio.run(main)
    assert calls == [("ask", 2), ("suspect", 2, 0.5, "block I/O not answered for 0.5 s"),
                     ("ask", 1),
                     ("suspect", 1, 0.0, "block I/O refused or its connection broken")]


# -- beacons: a node whose loop stalls while its process runs (comms/beacon.py) ---------

@dataclass
class Seen:
    """One node as its beacons would show it, in the sim's virtual time."""
    incarnation: int
    stopped: float | None = None      # beacons stopped then (frozen), else they come
    stalled: float | None = None      # its loop stopped then and has not run since
    last_stall: tuple[float, float] | None = None   # a stall that ended: (from, to)


class FakeBeacons:
    """What a node's beacon thread would have heard (comms/beacon.py `ages`)."""

    def __init__(self) -> None:
        self.nodes: dict[int, Seen] = {}

    def ages(self, node: int) -> Ages | None:
        seen = self.nodes.get(node)
        if seen is None:
            return None
        now = trio.current_time()
        last = now if seen.stopped is None else seen.stopped
        ran = last if seen.stalled is None else min(seen.stalled, last)
        began, ended = seen.last_stall or (None, None)
        return Ages(seen.incarnation, now - last + 0.05, now - ran + 0.05,
                    None if began is None else now - began,
                    None if ended is None else now - ended)

    def resume(self, node: int) -> None:
        """The node's loop runs again: its stall ended now."""
        seen = self.nodes[node]
        assert seen.stalled is not None
        seen.last_stall, seen.stalled = (seen.stalled, trio.current_time()), None


async def _stall(sim, beacons: FakeBeacons, node: int, *, frozen: bool = False,
                 inc: int | None = None) -> None:
    """Node `node` stops answering (its messages lost, as from a loop that does not run);
    its beacons go on (a stalled loop) or stop with it (frozen)."""
    now = trio.current_time()
    beacons.nodes[node] = Seen(sim.nodes[node].incarnation if inc is None else inc,
                               now if frozen else None, now)
    sim.isolate(node)
    for n in sim.nodes.values():
        if n.node_id != node:
            n.liveness = beacons


@mock_trio
async def test_a_probed_node_whose_loop_stalls_but_whose_process_runs_stays():
    """Node 1's loop stalls for 2 s (< the 3 s failure timeout) while its beacons go on:
    node 3 suspects it, the probe goes unanswered, but nobody takes it for dead; when its
    loop runs again it answers and the view is unchanged."""
    async def body(sim):
        await start_three(sim)
        g = sim.nodes[2].view.generation
        beacons = FakeBeacons()
        await _stall(sim, beacons, 1)
        await trio.sleep(INTERVAL)
        sim.nodes[3].suspect(1)
        await trio.sleep(2.0 - INTERVAL)
        assert sim.agreed([1, 2, 3], {1, 2, 3}) and sim.nodes[2].view.generation == g
        assert sim.nodes[3].probes_spared >= 1 and sim.nodes[3].probes_unanswered == 0
        beacons.resume(1)                      # its loop runs again: it answers
        sim.heal_all()
        await trio.sleep(2 * TIMEOUT)
        assert sim.agreed([1, 2, 3], {1, 2, 3}) and sim.nodes[2].view.generation == g
        assert sim.nodes[3]._probed == {}
    await with_sim([1, 2, 3], body)


@mock_trio
async def test_heartbeats_missed_for_the_failure_timeout_in_a_shorter_stall_are_excused():
    """The loop stalled just before a heartbeat was due, so its heartbeats have been
    missed for longer than the failure timeout while the loop has stalled for less:
    the stall explains the silence, and the node is alive to the others. Were its loop
    running (beacons say so) while nothing reached us, it would be dead."""
    async def body(sim):
        await start_three(sim)
        heard = sim.nodes[2]._peers[1].last_seen
        await trio.sleep(heard + INTERVAL * 0.9 - trio.current_time())
        beacons = FakeBeacons()
        await _stall(sim, beacons, 1)
        stalled = trio.current_time()
        await trio.sleep(heard + TIMEOUT + 0.1 - trio.current_time())
        now = trio.current_time()
        assert now - sim.nodes[2]._peers[1].last_seen > TIMEOUT      # heartbeats missed
        assert now - stalled < TIMEOUT                               # a shorter stall
        assert sim.nodes[2]._alive(1, now) and sim.nodes[3]._alive(1, now)
        assert sim.nodes[2].probes_spared == 1
        beacons.nodes[1] = Seen(sim.nodes[1].incarnation)           # runs, unreachable
        assert not sim.nodes[2]._alive(1, now)
    await with_sim([1, 2, 3], body)


@mock_trio
async def test_a_stalled_loop_is_dead_at_the_failure_timeout():
    """Beacons still come but the loop has not run for the failure timeout: removed
    then (a hung loop is a dead node), not at the probe's time."""
    async def body(sim):
        await start_three(sim)
        beacons = FakeBeacons()
        await _stall(sim, beacons, 1)
        stalled = trio.current_time()
        await trio.sleep(INTERVAL)
        sim.nodes[3].suspect(1)
        await sim.until(lambda: sim.agreed([2, 3], {2, 3}), TIMEOUT * 3)
        took = trio.current_time() - stalled
        assert TIMEOUT <= took < TIMEOUT + 2 * INTERVAL, took
        assert sim.nodes[3].probes_spared >= 1
    await with_sim([1, 2, 3], body)


@mock_trio
async def test_a_frozen_node_or_another_incarnation_gets_no_reprieve():
    """Beacons stopped with the loop (SIGSTOP, a cut), or beacons of an incarnation
    other than the member's: removed once the probe is unanswered, before the failure
    timeout, as without beacons."""
    for frozen, inc in ((True, None), (False, 12345)):
        async def body(sim, frozen=frozen, inc=inc):
            await start_three(sim)
            beacons = FakeBeacons()
            await _stall(sim, beacons, 1, frozen=frozen, inc=inc)
            await trio.sleep(INTERVAL)
            sim.nodes[3].suspect(1)
            took = await sim.until(lambda: sim.agreed([2, 3], {2, 3}), TIMEOUT * 3)
            assert INTERVAL + took < TIMEOUT, (frozen, inc, took)
            assert sim.nodes[3].probes_spared == 0
        await with_sim([1, 2, 3], body)


@mock_trio
async def test_a_node_that_runs_but_cannot_be_reached_gets_no_reprieve():
    """Its beacons come (UDP gets through) and say its loop runs, but our messages and
    heartbeats do not pass (the network between us is down): a stalled loop does not
    explain the silence, so the unanswered probe removes it as without beacons."""
    async def body(sim):
        await start_three(sim)
        beacons = FakeBeacons()
        beacons.nodes[1] = Seen(sim.nodes[1].incarnation)            # its loop runs
        sim.isolate(1)
        for n in (2, 3):
            sim.nodes[n].liveness = beacons
        await trio.sleep(INTERVAL)
        sim.nodes[3].suspect(1)
        took = await sim.until(lambda: sim.agreed([2, 3], {2, 3}), TIMEOUT * 3)
        assert INTERVAL + took < TIMEOUT, took
        assert sim.nodes[3].probes_spared == 0
    await with_sim([1, 2, 3], body)
