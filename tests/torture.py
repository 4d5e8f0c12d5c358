"""Lock torture: random request/convert/unlock on a few resources and ranges,
watched by an independent checker, with nodes killed mid-run.

The checker only learns about a lock from the holder, with the ordering that
makes any overlap it sees a real one: a holder reports "granted" AFTER it was
granted and "releasing" BEFORE it releases (or down-converts). So the
checker's view of each hold is inside the real hold, and two incompatible
overlapping holds in its view were really held at once.

`memory_torture()` runs it over the in-memory transport (many nodes in one
trio run, tests/test_torture.py); tests/test_torture_procs.py drives lockd
processes with the same Checker. A test helper (it was clusterfs/dlm/torture.py;
test scaffolding does not ship in the package).
"""

from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass, field
from typing import Any

import trio
from dlmcluster import MemCluster, memory_cluster

from clusterfs.dlm.interface import (
    ConversionDeadlock,
    Mode,
    conflicts,
    is_down_conversion,
    resource_key,
)
from clusterfs.errors import LockCancelled, LockError, WouldBlock

# A worker that finished no lock for this long at the end of a run is stuck (its
# holds last up to 15 ms, a recovery well under a second here)
STUCK_AFTER = 2.0


@dataclass
class Hold:
    node: int
    worker: int
    resource: Any
    mode: Mode
    range: tuple[int, int]
    since: int                # checker sequence number when reported granted
    lkid: int = 0


@dataclass
class Checker:
    """Holds as reported by the holders; fails on any incompatible overlap."""

    holds: dict[tuple[int, int], Hold] = field(default_factory=dict)   # (node, worker) -> hold
    seq: int = 0
    violations: list[str] = field(default_factory=list)
    dead: set[int] = field(default_factory=set)   # reports from these nodes are void
    grants: int = 0
    releases: int = 0
    converts: int = 0

    def granted(self, node: int, worker: int, resource: Any, mode: Mode,
                rng: tuple[int, int], lkid: int = 0) -> None:
        if node in self.dead:
            return    # a reply that was on its way when the node was killed
        self.seq += 1
        self.grants += 1
        new = Hold(node, worker, resource, Mode(mode), rng, self.seq, lkid)
        self._check(new)
        self.holds[(node, worker)] = new

    def converted(self, node: int, worker: int, mode: Mode) -> None:
        """Report an up-conversion AFTER it was granted, a down one BEFORE sending it."""
        if node in self.dead or (node, worker) not in self.holds:
            return
        self.seq += 1
        self.converts += 1
        h = self.holds[(node, worker)]
        h.mode = Mode(mode)
        self._check(h)

    def releasing(self, node: int, worker: int) -> None:
        self.seq += 1
        self.releases += 1
        self.holds.pop((node, worker), None)

    def node_died(self, node: int) -> None:
        """The node was killed (and its process reaped): it holds nothing any more."""
        self.dead.add(node)
        for k in [k for k in self.holds if k[0] == node]:
            del self.holds[k]

    def node_restarted(self, node: int) -> None:
        self.dead.discard(node)

    def _check(self, new: Hold) -> None:
        for key, h in self.holds.items():
            if key == (new.node, new.worker) or h.resource != new.resource:
                continue
            if conflicts(new.mode, new.range, h.mode, h.range):
                self.violations.append(
                    f"seq {self.seq}: node {new.node}/w{new.worker} {new.mode.name} "
                    f"{new.range} while node {h.node}/w{h.worker} holds {h.mode.name} "
                    f"{h.range} on {new.resource} (since seq {h.since})")


def random_request(rng: random.Random, resources: list[Any]) -> tuple[Any, Mode, tuple[int, int]]:
    res = rng.choice(resources)
    mode = rng.choices(list(Mode), weights=[1, 2, 2, 4, 2, 4])[0]
    if rng.random() < 0.4:
        rg = (0, 2**64 - 1)
    else:
        a = rng.randrange(0, 8) * 100
        rg = (a, a + rng.randrange(1, 4) * 100 - 1)
    return res, mode, rg


@dataclass
class TortureResult:
    checker: Checker
    ops: int = 0
    try_failed: int = 0
    deadlocks: int = 0
    kills: int = 0
    removed: int = 0      # idle resources the surviving masters freed (DLM_REMOVE)
    batches: int = 0      # DLM_BATCHes the live nodes sent (batching=True)
    lost_locks: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


async def memory_torture(node_ids: list[int], *, seconds: float, workers_per_node: int = 3,
                         resources: int = 3, kill_rounds: int = 1, seed: int = 1,
                         double_kills: bool = True, await_removal: bool = False,
                         batching: bool = False, merges: str | None = None) -> TortureResult:
    """Random locking on MemCluster nodes; every seconds/(kill_rounds+1) a node
    is crashed (then restarted and rejoined). Returns what the checker saw.

    batching: every node's lockspace sends through its outboxes all the time
    (Lockspace.batched), so requests, replies, grants, callbacks and recovery's own
    messages travel in DLM_BATCHes.

    merges: each round is a partition and a merge instead of a plain kill (see
    _merge_round), the frozen node's messages lost ("cut", what only the merge's
    resync repairs) or held and delivered late ("held", a SIGSTOP over TCP).

    At the end the workers finish their current lock and stop; with await_removal the
    run then waits (at most 30 s) until the masters have freed some idle resource,
    so a busy run that never left one idle for a whole toss period still shows it."""
    rng = random.Random(seed)
    names = [("torture", i) for i in range(resources)]
    checker = Checker()
    result = TortureResult(checker)

    async with memory_cluster(node_ids) as mc:

        stop = trio.Event()
        # (node, worker) -> when it last finished a lock or started: a lock lost in a
        # recovery (a grant or unlock dropped and never resent) leaves its worker stuck
        last_done: dict[tuple[int, int], float] = {}

        async def worker(node: int, w: int, wrng: random.Random) -> None:
            ls = mc.ls(node)
            last_done[(node, w)] = trio.current_time()
            while not stop.is_set():
                res, mode, rg = random_request(wrng, names)
                try:
                    lk = await ls.lock(res, mode, range=rg, try_=wrng.random() < 0.1)
                except WouldBlock:
                    result.try_failed += 1
                    continue
                except LockCancelled:
                    continue
                checker.granted(node, w, res, lk.mode, rg)
                result.ops += 1
                await trio.sleep(wrng.random() * 0.01)
                if wrng.random() < 0.3:
                    new = Mode(wrng.randrange(6))
                    try:
                        if is_down_conversion(lk.mode, new):
                            checker.converted(node, w, new)      # before: down
                            await ls.convert(lk, new)
                        else:
                            if not is_down_conversion(new, lk.mode):
                                checker.converted(node, w, Mode.CR)  # PR<->CW via CR
                            await ls.convert(lk, new, try_=wrng.random() < 0.3)
                            checker.converted(node, w, new)      # after: up
                    except (WouldBlock, ConversionDeadlock):
                        result.deadlocks += 1
                    except LockError as exc:
                        result.errors.append(f"node {node}: {exc}")
                    await trio.sleep(wrng.random() * 0.005)
                checker.releasing(node, w)
                await ls.unlock(lk)
                last_done[(node, w)] = trio.current_time()

        scopes: dict[int, trio.CancelScope] = {}

        async def node_workers(node: int, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
            with trio.CancelScope() as scope:
                scopes[node] = scope
                task_status.started()
                ls = mc.ls(node)
                with ls.batched() if batching else contextlib.nullcontext():
                    async with trio.open_nursery() as n:
                        for w in range(workers_per_node):
                            n.start_soon(worker, node, w, random.Random(rng.random()))

        async with trio.open_nursery() as nursery:
            for node in node_ids:
                await nursery.start(node_workers, node)
            period = seconds / (kill_rounds + 1)
            for rnd in range(kill_rounds):
                await trio.sleep(period)
                if merges:
                    victim = await _merge_round(mc, checker, rng, scopes,
                                                held=merges == "held")
                    result.kills += 1
                    checker.node_restarted(victim)
                    await mc.join(victim)
                    await mc.wait_running(30)
                    await nursery.start(node_workers, victim)
                    continue
                # every other round (with >= 5 nodes) two nodes die in quick
                # succession: the second view overtakes the first recovery
                count = 2 if double_kills and rnd % 2 == 1 and len(mc.nodes) >= 5 else 1
                victims = rng.sample(sorted(mc.nodes), count)
                survivors_before = {k: h for k, h in checker.holds.items()
                                    if k[0] not in victims}
                for i, victim in enumerate(victims):
                    if i:
                        await trio.sleep(rng.random() * 0.01)
                    scopes[victim].cancel()
                    mc.crash(victim)
                    checker.node_died(victim)
                    result.kills += 1
                await mc.wait_running(30)
                _check_not_lost(mc, checker, survivors_before, result)
                for victim in victims:
                    checker.node_restarted(victim)
                    await mc.join(victim)
                    await mc.wait_running(30)
                    await nursery.start(node_workers, victim)
            await trio.sleep(period)
            now = trio.current_time()
            result.errors += [f"node {n}/w{w}: no lock for {now - t:.1f} s (stuck)"
                              for (n, w), t in sorted(last_done.items())
                              if n in mc.nodes and now - t > STUCK_AFTER]
            stop.set()
            if await_removal:
                with trio.move_on_after(30):
                    while _removed(mc) == 0:
                        await trio.sleep(0.05)
            result.removed = _removed(mc)
            result.batches = sum(mc.ls(n).statistics().batches_sent for n in mc.nodes)
            _check_one_master_each(mc, result)
            nursery.cancel_scope.cancel()
    return result


async def _merge_round(mc: MemCluster, checker: Checker, rng: random.Random,
                       scopes: dict[int, trio.CancelScope], held: bool) -> int:
    """One node freezes (`held`: its messages late, else lost) as another dies and the
    third goes on alone without quorum, then the two merge
    (MemCluster.freeze_and_merge). Every hold stays valid throughout: the checker
    sees any two incompatible holds at once. The dead node, to restart."""
    lone, frozen, dead = rng.sample(sorted(mc.nodes), 3)
    scopes[dead].cancel()
    mc.crash(dead, remove=False)
    checker.node_died(dead)
    await mc.freeze_and_merge(rng, lone, frozen, dead, held=held)
    return dead


def _removed(mc: MemCluster) -> int:
    return sum(mc.ls(nid).stats["removed"] for nid in mc.nodes)


def _check_one_master_each(mc: MemCluster, result: TortureResult) -> None:
    """No resource has two masters (a lost DLM_REMOVE race, a bad recovery)."""
    result.lost_locks += [f"{k!r}: several masters {masters}"
                          for k, masters in mc.several_masters().items()]


def _check_not_lost(mc: MemCluster, checker: Checker, before: dict[tuple[int, int], Hold],
                    result: TortureResult) -> None:
    """Every hold a survivor had across the kill is still granted at its master."""
    _check_one_master_each(mc, result)
    for key, h in before.items():
        now = checker.holds.get(key)
        if now is None or now.since != h.since:
            continue   # released meanwhile: fine
        rkey = resource_key(h.resource)
        masters = [nid for nid in mc.nodes if rkey in mc.ls(nid).ls_mastered]
        if len(masters) != 1:
            result.lost_locks.append(f"{h.resource}: masters {masters}")
            continue
        infos = mc.ls(masters[0]).dump_local(rkey) or []
        if not any(i.nodeid == h.node and i.grmode is not None and i.range == h.range
                   for i in infos):
            result.lost_locks.append(f"node {h.node}/w{h.worker} lost {h.resource} {h.range}")
