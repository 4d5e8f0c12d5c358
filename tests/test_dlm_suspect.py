"""Suspicion from lock messages (clusterfs/dlm/watch.py): an answer owed too long makes
the node that owes it a suspect, which membership probes (issue 7; issue 8 item 3).

Tier 2 (many nodes in one trio run, StaticCluster records the suspicions) shows what
the DLM watches; tier 3 (three `clusterfs lockd` processes over TCP on 127.0.0.1)
shows the whole path: a SIGSTOPped master or holder is removed, fenced and recovered
from long before the failure timeout (30 s here), and a node that keeps a contended
lock for a long time while it answers the probes is not removed.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import zlib
from typing import Any

import pytest
import trio
from dlmcluster import MemCluster, memory_cluster
from trioutil import trio_test, wait_until

from clusterfs.dlm.interface import Mode, resource_key
from clusterfs.node.lockbench_cmd import LocalLockCluster
from clusterfs.node.lockd_cmd import ControlClient, parse_name

T = 0.1          # the tier-2 answer timeout


def suspected(mc: MemCluster, by: int, node: int) -> list[str]:
    return [why for s, n, why in mc.cluster.suspicions if s == by and n == node]


def name_with_dir_node(mc: MemCluster, asker: int, dir_node: int) -> tuple:
    for i in range(1000):
        name = ("inode", i)
        if mc.ls(asker)._dir_node(resource_key(name)) == dir_node:
            return name
    raise AssertionError("no such name")


# -- tier 2 --------------------------------------------------------------------------

@pytest.mark.parametrize("via", ["lookup", "request"])
@trio_test
async def test_a_master_that_does_not_answer_is_suspected(via: str) -> None:
    """Node 3 masters a resource and goes silent (its links cut: what it is sent is
    lost, as with a frozen process; no heartbeat of it is heard here). Node 2's lookup
    (directory node 3) or request (directory node 1, master 3) goes unanswered: node 2
    tells membership to look at node 3 after about the answer timeout, once while it
    stays silent (membership's probe decides)."""
    async with memory_cluster([1, 2, 3], answer_timeout=T) as mc:
        name = name_with_dir_node(mc, 2, 3 if via == "lookup" else 1)
        held = await mc.ls(3).lock(name, Mode.NL)          # the first asker masters it
        assert held.granted
        mc.net.cut(2, 3)
        start = trio.current_time()
        async with trio.open_nursery() as n:
            n.start_soon(mc.ls(2).lock, name, Mode.EX)
            await wait_until(lambda: suspected(mc, 2, 3), timeout=5)
            took = trio.current_time() - start
            assert T <= took < 2.0, took
            what = suspected(mc, 2, 3)[0]
            assert ("lookup" in what) == (via == "lookup"), what
            await trio.sleep(4 * T)
            assert len(suspected(mc, 2, 3)) == 1, suspected(mc, 2, 3)
            assert mc.ls(2).statistics().suspected == len(suspected(mc, 2, 3))
            mc.crash(3)                       # membership's verdict: the view without 3
            await mc.wait_running()
            n.cancel_scope.cancel()
        assert not suspected(mc, 2, 1) and not suspected(mc, 1, 3)


@trio_test
async def test_a_holder_that_does_not_demote_is_suspected_until_it_does() -> None:
    """Node 1 masters, node 3 holds EX and ignores the blocking callback, node 2 waits
    for EX. The master suspects the holder (asked to demote, it has not) and the
    waiter suspects the master (queued, not granted); once node 3 unlocks, node 2 is
    granted and nobody is suspected any more. (Membership here hears no heartbeats,
    so every node is silent to it; a suspicion is only recorded.)"""
    async with memory_cluster([1, 2, 3], answer_timeout=T) as mc:
        name = name_with_dir_node(mc, 2, 1)
        await mc.ls(1).lock(name, Mode.NL)
        held = await mc.ls(3).lock(name, Mode.EX)
        got: list[Any] = []

        async def want() -> None:
            got.append(await mc.ls(2).lock(name, Mode.EX))

        async with trio.open_nursery() as n:
            n.start_soon(want)
            await trio.sleep(10 * T)
            assert not got
            by_master = suspected(mc, 1, 3)
            assert by_master and "asked to demote" in by_master[0], by_master
            by_waiter = suspected(mc, 2, 1)
            assert by_waiter and "queued there, not granted" in by_waiter[0], by_waiter
            await mc.ls(3).unlock(held)
        assert got[0].granted
        before = len(mc.cluster.suspicions)
        await trio.sleep(5 * T)
        assert len(mc.cluster.suspicions) == before
        assert not mc.ls(1).ls_basts and not mc.ls(2).ls_waiting


@trio_test
async def test_a_holder_still_heard_from_is_not_suspected_until_it_falls_silent() -> None:
    """The same long hold, but membership still hears node 3 (its heartbeats): its
    overdue demote is counted, not suspected - it is alive, only keeping its lock.
    When it falls silent (no heartbeat for the answer timeout), it is suspected."""
    async with memory_cluster([1, 2, 3], answer_timeout=T) as mc:
        name = name_with_dir_node(mc, 2, 1)
        await mc.ls(1).lock(name, Mode.NL)
        held = await mc.ls(3).lock(name, Mode.EX)

        async def heartbeats(node: int) -> None:
            while True:
                mc.cluster.heard[node] = trio.current_time()
                await trio.sleep(T / 4)

        async with trio.open_nursery() as n:
            beats = trio.CancelScope()

            async def beat_3() -> None:
                with beats:
                    await heartbeats(3)

            n.start_soon(beat_3)
            n.start_soon(heartbeats, 1)
            n.start_soon(mc.ls(2).lock, name, Mode.EX)
            await trio.sleep(10 * T)
            assert mc.cluster.suspicions == []
            assert mc.ls(1).statistics().overdue == 1        # the demote, counted once
            assert mc.ls(2).statistics().overdue == 1        # the wait on master 1
            beats.cancel()                                   # node 3 falls silent
            silent_at = mc.cluster.heard[3]                  # its last heartbeat
            await wait_until(lambda: suspected(mc, 1, 3), timeout=5)
            assert trio.current_time() - silent_at >= T
            assert not suspected(mc, 2, 1)
            await mc.ls(3).unlock(held)
            await wait_until(lambda: not mc.ls(2).ls_waiting)
            n.cancel_scope.cancel()


@trio_test
async def test_answered_lock_traffic_suspects_nobody() -> None:
    async with memory_cluster([1, 2, 3], answer_timeout=T) as mc:
        for i in range(60):
            ls = mc.ls(1 + i % 3)
            lk = await ls.lock(("x", i % 7), Mode.EX)
            await trio.sleep(T / 10)
            await ls.unlock(lk)
        await trio.sleep(3 * T)
        assert mc.cluster.suspicions == []
        assert all(not mc.ls(n).ls_waiting and not mc.ls(n).ls_lookup_since
                   for n in (1, 2, 3))


async def _into(out: list, awaitable: Any) -> None:
    out.append(await awaitable)


@trio_test
async def test_a_query_its_master_does_not_answer_is_suspected_and_ends_with_the_view() -> None:
    """DLM_QUERY (dump_resource: a resource's queues, asked of its master). Node 3
    masters a resource node 1 holds PR on, and goes silent; node 2's query is not
    answered: node 2 suspects node 3 after about the answer timeout (before: nobody
    did, and the query gave up after QUERY_TIMEOUT, 5 s). The view without node 3 ends
    the wait, and the query is asked again of the master after the recovery."""
    async with memory_cluster([1, 2, 3], answer_timeout=T) as mc:
        name = name_with_dir_node(mc, 2, 1)
        await mc.ls(3).lock(name, Mode.NL)                 # the first asker masters it
        await mc.ls(1).lock(name, Mode.PR)
        mc.net.cut(2, 3)
        start = trio.current_time()
        got: list[dict] = []
        async with trio.open_nursery() as n:
            n.start_soon(_into, got, mc.ls(2).dump_resource(name))
            await wait_until(lambda: suspected(mc, 2, 3), timeout=5)
            took = trio.current_time() - start
            assert T <= took < 2.0, took
            assert "query" in suspected(mc, 2, 3)[0], suspected(mc, 2, 3)
            assert not got
            mc.crash(3)                       # membership's verdict: the view without 3
        took = trio.current_time() - start
        assert took < 2.0, took               # not QUERY_TIMEOUT
        assert got[0]["master"] == 1, got
        assert [(i["node"], i["grmode"]) for i in got[0]["locks"]] == [(1, "PR")], got
        assert not mc.ls(2).ls_queries
        await wait_until(lambda: not mc.ls(2).ls_query_since)     # dropped when judged


@trio_test
async def test_an_ask_for_servers_its_master_does_not_answer_is_suspected() -> None:
    """DLM_PREFER_ASK (routing.py). Servers 1 and 2, node 3 proxies, node 4 masters
    some of node 3's locks and goes silent. Node 3's proxy finds server 1 silent
    (`reprefer(1)`): the masters it can reach name server 2 at once, node 4 does not
    answer, and node 3 suspects it (before: nobody waited for that answer, and node 4,
    owed nothing else, was found only by the failure timeout). Masters with nothing to
    name answer too. After the view without node 4, every lock names server 2."""
    async with memory_cluster([1, 2, 3, 4], servers=frozenset({1, 2}),
                              answer_timeout=T) as mc:
        names = [("rgrp", i) for i in range(40)]
        for i, name in enumerate(names):                 # masters: 1, 2, 3, 4 in turn
            first = mc.ls(1 + i % 4)
            await first.unlock(await first.lock(name, Mode.NL))
        locks = {name: await mc.ls(3).lock(name, Mode.EX) for name in names}
        on_4 = [n for i, n in enumerate(names) if i % 4 == 3 and locks[n].server == 1]
        assert on_4 and any(lk.server == 1 for n, lk in locks.items() if n not in on_4)
        mc.net.cut(3, 4)
        start = trio.current_time()
        mc.ls(3).reprefer(1)
        await wait_until(lambda: suspected(mc, 3, 4), timeout=5)
        assert T <= trio.current_time() - start < 2.0
        assert "ask" in suspected(mc, 3, 4)[0], suspected(mc, 3, 4)
        assert [m for m, _ in mc.ls(3).ls_asks.values()] == [4]    # the others answered
        assert {locks[n].server for n in on_4} == {1}
        assert all(lk.server == 2 for n, lk in locks.items() if n not in on_4)
        mc.crash(4)                           # membership's verdict: the view without 4
        await mc.wait_running()
        await wait_until(lambda: all(lk.server == 2 for lk in locks.values()), timeout=5)
        await wait_until(lambda: not mc.ls(3).ls_asks and not mc.ls(3).ls_ask_since)
        assert {n for _, n, _ in mc.cluster.suspicions} == {4}


# -- tier 3: lockd processes -------------------------------------------------------

FAILURE_TIMEOUT = 30.0       # long: only a suspicion can remove a node in this test
ANSWER_TIMEOUT = 0.5
PROBE_TIMEOUT = 2.0


@pytest.fixture
def slow_cluster(tmp_path):
    """Three lockds whose heartbeats would take 30 s to find a frozen node."""
    with LocalLockCluster([1, 2, 3], workdir=str(tmp_path), verbose=True,
                          failure_timeout=FAILURE_TIMEOUT, answer_timeout=ANSWER_TIMEOUT,
                          probe_timeout=PROBE_TIMEOUT) as cl:
        cl.start_all()
        stopped: list[int] = []
        cl.stopped = stopped          # type: ignore[attr-defined]
        try:
            yield cl
        finally:
            for pid in stopped:       # our own SIGSTOPped lockd, if it still exists
                try:
                    os.kill(pid, signal.SIGCONT)
                except ProcessLookupError:
                    pass


def sigstop(cl: LocalLockCluster, node: int) -> float:
    pid = cl.procs[node].pid
    cl.stopped.append(pid)            # type: ignore[attr-defined]
    os.kill(pid, signal.SIGSTOP)
    return time.monotonic()


def lock_in_thread(path: str, result: dict[str, Any], **req: Any) -> threading.Thread:
    def run() -> None:
        with ControlClient(path, timeout=FAILURE_TIMEOUT + 30) as c:
            result.update(c.call("lock", **req))
            result["at"] = time.monotonic()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def wait_members(c: ControlClient, members: list[int], deadline: float) -> float:
    while True:
        st = c.call("status")
        if st["members"] == members and st["running"]:
            return time.monotonic()
        assert time.monotonic() < deadline, st
        time.sleep(0.05)


def name_with_dir_node_1(prefix: str) -> str:
    """A lockd resource name whose directory node, of members 1 2 3, is node 1 (the
    hash of directory.py), so that what node 3 is asked is a request or a blocking
    callback, not a lookup."""
    for i in range(1000):
        name = f"{prefix}:{i}"
        if zlib.crc32(resource_key(parse_name(name))) % 3 == 0:
            return name
    raise AssertionError("no such name")


def master_is(c: ControlClient, name: str, master: int) -> None:
    r = c.call("locks", name=name)
    assert r["ok"] and r["master"] == master, r


@pytest.mark.parametrize("frozen_is", ["master", "holder"])
def test_a_frozen_node_is_removed_long_before_the_failure_timeout(
        slow_cluster: LocalLockCluster, frozen_is: str) -> None:
    """SIGSTOP node 3 (its connections stay up) while it masters a resource node 2
    then asks for (its request is not answered), or while it holds EX on a resource
    node 1 masters (it never demotes). Node 2's lockspace, resp. node 1's, suspects
    it; membership probes it; it does not answer; the view drops it, the process
    agent fences it (SIGKILL), recovery runs, and node 2 is granted - all with a
    failure timeout of 30 s that alone would have kept node 2 waiting 30 s."""
    cl = slow_cluster
    name = name_with_dir_node_1("frozen")
    c1, c2 = ControlClient(cl.control(1)), ControlClient(cl.control(2))
    try:
        with ControlClient(cl.control(3)) as c3:
            if frozen_is == "master":
                assert c3.call("lock", name=name, mode="NL")["ok"]     # 3 masters it
                master_is(c1, name, 3)
            else:
                assert c1.call("lock", name=name, mode="NL")["ok"]     # 1 masters it
                assert c3.call("lock", name=name, mode="EX")["ok"]     # 3 holds it
                master_is(c1, name, 1)
            gen = c1.call("status")["generation"]
            stopped = sigstop(cl, 3)
            result: dict[str, Any] = {}
            waiter = lock_in_thread(cl.control(2), result, name=name, mode="EX",
                                    timeout=FAILURE_TIMEOUT + 10)
            removed = wait_members(c1, [1, 2], stopped + FAILURE_TIMEOUT - 5)
            waiter.join(FAILURE_TIMEOUT)
        assert result.get("ok"), result
        granted = result["at"]
        print(f"\nfrozen {frozen_is}: removed {removed - stopped:.2f} s and node 2 granted "
              f"{granted - stopped:.2f} s after the SIGSTOP (answer_timeout {ANSWER_TIMEOUT}"
              f" s, probe_timeout {PROBE_TIMEOUT} s, failure_timeout {FAILURE_TIMEOUT} s)")
        # the ordering that matters: out of the view and recovered from, well before
        # the failure timeout could have removed it
        assert granted - stopped < FAILURE_TIMEOUT / 2
        assert cl.procs[3].wait(timeout=10) == -signal.SIGKILL      # fenced
        if frozen_is == "holder":
            assert result["lvb_valid"] is False        # a dead EX holder's LVB
        st = c1.call("status")
        assert st["generation"] > gen and st["members"] == [1, 2]
        suspecter = 2 if frozen_is == "master" else 1
        assert ControlClient(cl.control(suspecter)).call("status")["lockspace"]["suspected"] >= 1
        log = cl.log_tail(suspecter, 200_000)
        assert "and node 3 silent" in log and "asking membership to look at it" in log
        assert ("waiting" if frozen_is == "master" else "asked to demote") in log
        assert (f"did not answer our probe within {PROBE_TIMEOUT:.2f} s"
                in cl.log_tail(1, 200_000) + cl.log_tail(2, 200_000))
    finally:
        c1.close()
        c2.close()


def test_a_query_of_a_frozen_master_ends_and_the_master_is_removed(
        slow_cluster: LocalLockCluster) -> None:
    """`clusterfs lockd`'s "locks" (dump_resource, DLM_QUERY) of a resource whose master,
    node 3, is SIGSTOPped: node 2 suspects it (its query owed for answer_timeout, it
    silent as long), membership probes and removes it, and the query, ended by that
    view, is asked again of the new master, node 1 (it holds PR there). Before: the
    query failed after 5 s (Timeout) and node 3 stayed for the failure timeout (30 s)."""
    cl = slow_cluster
    name = name_with_dir_node_1("query")
    c1, c2 = ControlClient(cl.control(1)), ControlClient(cl.control(2))
    try:
        with ControlClient(cl.control(3)) as c3:
            assert c3.call("lock", name=name, mode="NL")["ok"]     # 3 masters it
        assert c1.call("lock", name=name, mode="PR")["ok"]
        master_is(c2, name, 3)
        stopped = sigstop(cl, 3)
        with ControlClient(cl.control(2), timeout=FAILURE_TIMEOUT) as c:
            r = c.call("locks", name=name, timeout=FAILURE_TIMEOUT)
        answered = time.monotonic()
        removed = wait_members(c1, [1, 2], stopped + FAILURE_TIMEOUT - 5)
        print(f"\nquery of a frozen master: answered {answered - stopped:.2f} s after the "
              f"SIGSTOP (by the new master), node 3 out of the view by "
              f"{removed - stopped:.2f} s (answer_timeout {ANSWER_TIMEOUT} s, "
              f"probe_timeout {PROBE_TIMEOUT} s, failure_timeout {FAILURE_TIMEOUT} s)")
        assert r["ok"] and r["master"] == 1, r
        assert [(i["node"], i["grmode"]) for i in r["locks"]] == [(1, "PR")], r
        assert answered - stopped < FAILURE_TIMEOUT / 2
        assert cl.procs[3].wait(timeout=10) == -signal.SIGKILL      # fenced
        assert c2.call("status")["lockspace"]["suspected"] >= 1
        log = cl.log_tail(2, 200_000)
        assert "query" in log and "and node 3 silent" in log, log[-3000:]
    finally:
        c1.close()
        c2.close()


def test_a_long_holder_that_answers_is_not_removed(slow_cluster: LocalLockCluster) -> None:
    """Node 3 holds EX on a resource node 1 masters, and keeps it for several
    answer-plus-probe timeouts while node 2 waits: node 1 finds node 3's demote overdue
    and node 2 its lock on master 1 overdue, but both nodes are heard from (their
    heartbeats), so they are alive: nobody is removed (if a late heartbeat makes one a
    suspect, it answers the probe). Node 3 unlocks; node 2 is granted in the same
    view."""
    cl = slow_cluster
    name = name_with_dir_node_1("held")
    c1 = ControlClient(cl.control(1))
    c3 = ControlClient(cl.control(3))
    try:
        assert c1.call("lock", name=name, mode="NL")["ok"]
        held = c3.call("lock", name=name, mode="EX")
        assert held["ok"]
        gen = c1.call("status")["generation"]
        result: dict[str, Any] = {}
        waiter = lock_in_thread(cl.control(2), result, name=name, mode="EX",
                                timeout=FAILURE_TIMEOUT)
        hold = 4 * (ANSWER_TIMEOUT + PROBE_TIMEOUT)
        deadline = time.monotonic() + hold
        while time.monotonic() < deadline:
            st = c1.call("status")
            assert st["members"] == [1, 2, 3] and st["generation"] == gen, st
            assert not result, result
            time.sleep(0.2)
        assert c1.call("status")["lockspace"]["overdue"] >= 1     # the demote
        with ControlClient(cl.control(2)) as c2:
            assert c2.call("status")["lockspace"]["overdue"] >= 1  # the wait on master 1
        logs = "".join(cl.log_tail(n, 200_000) for n in (1, 2, 3))
        assert "did not answer our probe" not in logs
        assert c3.call("unlock", handle=held["handle"])["ok"]
        waiter.join(20)
        assert result.get("ok"), result
        st = c1.call("status")
        assert st["members"] == [1, 2, 3] and st["generation"] == gen, st
        assert json.loads(json.dumps(st))["running"]
    finally:
        c1.close()
        c3.close()


STALL = 3.0


def test_a_master_whose_loop_stalls_while_its_process_runs_is_not_removed(
        tmp_path, monkeypatch) -> None:
    """Node 3's event loop stops for 3 s (SIGUSR2 with the test hook: a long collection
    or a CPU shortage, as a loaded machine makes them) while its process runs, as its
    beacon thread says (comms/beacon.py). Node 2's request to it goes unanswered for
    answer_timeout, node 2 suspects it, membership probes it and the probe goes
    unanswered for probe_timeout: before beacons, node 3 was removed and fenced
    (SIGKILL) although alive. Now it stays, answers once its loop runs, and node 2 is
    granted in the same view."""
    from clusterfs.node.cluster import STALL_ENV

    monkeypatch.setenv(STALL_ENV, str(STALL))
    with LocalLockCluster([1, 2, 3], workdir=str(tmp_path), verbose=True,
                          failure_timeout=2 * STALL, answer_timeout=ANSWER_TIMEOUT,
                          probe_timeout=1.0) as cl:
        cl.start_all()
        name = name_with_dir_node_1("stalled")
        with ControlClient(cl.control(1)) as c1, ControlClient(cl.control(3)) as c3:
            assert c3.call("lock", name=name, mode="NL")["ok"]        # 3 masters it
            master_is(c1, name, 3)
            gen = c1.call("status")["generation"]
            os.kill(cl.procs[3].pid, signal.SIGUSR2)
            stalled = time.monotonic()
            time.sleep(0.1)
            result: dict[str, Any] = {}
            waiter = lock_in_thread(cl.control(2), result, name=name, mode="EX",
                                    timeout=4 * STALL)
            waiter.join(4 * STALL)
            assert result.get("ok"), result
            print(f"\nnode 2 granted {result['at'] - stalled:.2f} s after node 3's loop "
                  f"stalled for {STALL} s (answer_timeout {ANSWER_TIMEOUT} s, probe_timeout "
                  f"1.0 s, failure_timeout {2 * STALL} s)")
            assert result["at"] - stalled >= STALL - 0.2        # node 3 answered it
            st = c1.call("status")
            assert st["generation"] == gen and st["members"] == [1, 2, 3], st
            assert cl.procs[3].poll() is None                    # not fenced
            with ControlClient(cl.control(2)) as c2:
                d = c2.call("status")["detection"]
            assert d["probes"] >= 1 and d["spared"] >= 1 and d["unanswered"] == 0, d
            assert d["beacons_received"] > 0
        logs = "".join(cl.log_tail(n, 200_000) for n in (1, 2))
        assert "stalling the event loop" in cl.log_tail(3, 200_000)
        assert "its process runs (beacon)" in logs
        assert "did not answer our probe within 1.00 s: taken for dead" not in logs
