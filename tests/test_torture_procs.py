"""Tier 3/4 torture: lockd processes on 127.0.0.1, random request/convert/unlock
from several workers per node, an independent checker in this process, and
rounds where a node is killed -9 mid-run (then restarted and rejoined). Every
other kill (the first included) is the lowest id (the membership coordinator: restarted, it
coordinates again at once and must not remove live nodes it has not heard from
yet); no live lockd may be expelled (exit status 3) or exit at all.

Ordering that makes the checker sound: a worker reports "granted" after the
lockd's reply arrived, "releasing" before it sends the unlock (and a
down-conversion before it is sent), so every hold the checker sees lies inside
the real one.
"""

from __future__ import annotations

import random

import pytest
import trio
from torture import Checker, random_request
from trioutil import trio_test

from clusterfs.dlm.interface import Mode, is_down_conversion
from clusterfs.node.lockbench_cmd import LocalLockCluster
from clusterfs.node.lockd_cmd import AsyncControlClient

LOCK_TIMEOUT = 60     # a waiting request that does not complete by then fails the test


async def run_torture(tmp: str, nodes: list[int], *, seconds: float, kill_rounds: int,
                      workers: int = 3, seed: int = 5, failure_timeout: float = 1.5,
                      resources: int = 3) -> dict:
    rng = random.Random(seed)
    names = [["torture", i] for i in range(resources)]
    checker = Checker()
    stats = {"ops": 0, "timeouts": [], "lost": [], "kills": 0, "errors": [], "exited": [],
             "expelled": [], "victims": [], "removed": 0}

    def check_alive() -> None:
        """No lockd we did not kill has exited (an expelled lockd exits with status 3)."""
        for nid, proc in cl.procs.items():
            if proc.poll() is not None and (nid, proc.returncode) not in stats["exited"]:
                stats["exited"].append((nid, proc.returncode))
        for nid in nodes:
            text = cl.log_tail(nid, 10**8)
            if (("EXPELLED by" in text or "expelled from the cluster" in text)
                    and nid not in stats["expelled"]):
                stats["expelled"].append(nid)
    cl = LocalLockCluster(nodes, workdir=tmp, verbose=True, failure_timeout=failure_timeout)
    try:
        await trio.to_thread.run_sync(cl.start_all)
        # master the resources on the nodes that will be killed (first asker masters)
        for i, res in enumerate(names):
            c = await AsyncControlClient.connect(cl.control(nodes[1 + i % (len(nodes) - 1)]))
            r = await c.call("lock", name=res, mode="NL")
            await c.call("unlock", handle=r["handle"])
            await c.aclose()

        async def worker(node: int, w: int, wrng: random.Random) -> None:
            try:
                c = await AsyncControlClient.connect(cl.control(node))
            except OSError:
                return
            key = (node, w)
            try:
                while True:
                    res, mode, rg = random_request(wrng, names)
                    r = await c.call("lock", name=res, mode=mode.name, range=list(rg),
                                     timeout=LOCK_TIMEOUT, **{"try": wrng.random() < 0.1})
                    if not r["ok"]:
                        if r["error"] == "Timeout":
                            stats["timeouts"].append((node, w, res, mode.name))
                        elif r["error"] != "WouldBlock":
                            stats["errors"].append(r)
                        continue
                    checker.granted(node, w, tuple(res), Mode[r["mode"]], rg, r["lkid"])
                    stats["ops"] += 1
                    h = r["handle"]
                    await trio.sleep(wrng.random() * 0.02)
                    if wrng.random() < 0.3:
                        held = checker.holds.get(key)
                        if held is None:
                            return     # our node was killed meanwhile
                        cur = held.mode
                        new = Mode(wrng.randrange(6))
                        if is_down_conversion(cur, new):
                            checker.converted(node, w, new)
                            r = await c.call("convert", handle=h, mode=new.name)
                        else:
                            if not is_down_conversion(new, cur):
                                checker.converted(node, w, Mode.CR)
                            r = await c.call("convert", handle=h, mode=new.name,
                                             timeout=LOCK_TIMEOUT)
                            if r["ok"]:
                                checker.converted(node, w, new)
                            elif r["error"] == "Timeout":
                                stats["timeouts"].append((node, w, res, "convert"))
                    checker.releasing(node, w)
                    await c.call("unlock", handle=h)
            except (ConnectionError, trio.BrokenResourceError, trio.ClosedResourceError,
                    OSError):
                return     # our node was killed

        async def lost_check(survivors: list[int], before: dict) -> None:
            """Survivors' holds from before the kill are still granted at the master."""
            c = await AsyncControlClient.connect(cl.control(survivors[0]))
            try:
                for key, h in before.items():
                    now = checker.holds.get(key)
                    if now is None or now.since != h.since:
                        continue
                    r = await c.call("locks", name=list(h.resource), timeout=20)
                    now = checker.holds.get(key)
                    if now is None or now.since != h.since:
                        continue      # released while we asked
                    if not r["ok"] or not any(lk["lkid"] == h.lkid and lk["grmode"]
                                              for lk in r["locks"]):
                        stats["lost"].append((key, h.resource, r))
            finally:
                await c.aclose()

        async with trio.open_nursery() as nursery:
            scopes: dict[int, trio.CancelScope] = {}

            def start_workers(node: int) -> None:
                scope = trio.CancelScope()
                scopes[node] = scope

                async def run_node() -> None:
                    with scope:
                        async with trio.open_nursery() as n:
                            for w in range(workers):
                                n.start_soon(worker, node, w, random.Random(rng.random()))
                nursery.start_soon(run_node)

            for node in nodes:
                start_workers(node)
            period = seconds / (kill_rounds + 1)
            for k in range(kill_rounds):
                await trio.sleep(period)
                # every other victim is the lowest id, the membership coordinator
                victim = nodes[0] if k % 2 == 0 else rng.choice(nodes)
                stats["victims"].append(victim)
                before = {k: h for k, h in checker.holds.items() if k[0] != victim}
                await trio.to_thread.run_sync(cl.kill, victim)       # kill -9
                checker.node_died(victim)
                stats["kills"] += 1
                survivors = [n for n in nodes if n != victim]
                await trio.to_thread.run_sync(lambda s=survivors: cl.wait_running(s, 30))
                await lost_check(survivors, before)
                scopes[victim].cancel()
                await trio.sleep(0.1)         # its workers notice the broken connections
                checker.node_restarted(victim)
                cl.start(victim)
                await trio.to_thread.run_sync(cl.wait_ready, victim)
                await trio.to_thread.run_sync(lambda: cl.wait_running(nodes, 30))
                check_alive()
                start_workers(victim)
            await trio.sleep(period)
            check_alive()
            stats["removed"] = await _resources_removed(cl, nodes)
            nursery.cancel_scope.cancel()
    finally:
        await trio.to_thread.run_sync(cl.close)
    stats["checker"] = checker
    return stats


async def _resources_removed(cl: LocalLockCluster, nodes: list[int]) -> int:
    """How many idle resources the live lockds freed (DLM_REMOVE), in total."""
    total = 0
    for nid in nodes:
        c = await AsyncControlClient.connect(cl.control(nid))
        try:
            total += (await c.call("status"))["lockspace"]["removed"]
        finally:
            await c.aclose()
    return total


@trio_test
async def test_torture_three_lockd_processes_with_kill9(tmp_path) -> None:
    st = await run_torture(str(tmp_path), [1, 2, 3], seconds=24, kill_rounds=2)
    chk: Checker = st["checker"]
    assert chk.violations == []
    assert st["lost"] == []
    assert st["timeouts"] == []
    assert st["errors"] == []
    assert st["kills"] == 2 and st["victims"][0] == 1
    assert st["exited"] == [] and st["expelled"] == []
    assert st["ops"] > 100, st["ops"]


@trio_test
async def test_torture_five_lockd_processes_killing_the_coordinator(tmp_path) -> None:
    st = await run_torture(str(tmp_path), [1, 2, 3, 4, 5], seconds=30, kill_rounds=3,
                           workers=2, seed=11)
    assert st["victims"][0] == st["victims"][2] == 1
    assert st["exited"] == [] and st["expelled"] == []
    assert st["checker"].violations == [] and st["lost"] == [] and st["timeouts"] == []
    assert st["errors"] == [] and st["kills"] == 3


@trio_test
async def test_torture_with_idle_resources_removed(tmp_path, monkeypatch) -> None:
    """Many resources, each idle now and then, and a toss time short enough
    that masters free them (DLM_REMOVE) while others look them up and request.
    (With 24 resources they were idle long enough only while a dead node's locks
    still blocked the others; since a refused port detects the death at once, that
    window is a few tenths of a second: 64 make them idle all along.)"""
    monkeypatch.setenv("CLUSTERFS_DLM_TOSS_SECONDS", "0.3")
    st = await run_torture(str(tmp_path), [1, 2, 3], seconds=20, kill_rounds=1,
                           resources=64, seed=17)
    assert st["checker"].violations == [] and st["lost"] == [] and st["timeouts"] == []
    assert st["errors"] == [] and st["exited"] == [] and st["expelled"] == []
    assert st["removed"] > 0 and st["ops"] > 100, st


@pytest.mark.slow
@trio_test
async def test_torture_long(tmp_path) -> None:
    # (5 processes on a small machine: a longer failure timeout, so that a
    # loaded node is not expelled - there is no real fencing here)
    st = await run_torture(str(tmp_path), [1, 2, 3, 4, 5], seconds=180, kill_rounds=8,
                           workers=4, seed=9, failure_timeout=5.0)
    assert st["checker"].violations == [] and st["lost"] == [] and st["timeouts"] == []
    assert st["exited"] == [] and st["expelled"] == [] and st["victims"][0] == 1
