"""Randomized churn over the in-memory transport in virtual time: kills, restarts,
link cuts, isolations and heals; then invariants over every node's event log and
convergence once the network is whole again."""

from __future__ import annotations

import contextlib
import heapq
import itertools
import random
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import trio
from test_membership import DETECT, Sim, mock_trio, with_sim

from clusterfs.membership.service import EXPELLED, MEMBER, MembershipService
from clusterfs.membership.view import Fenced, ViewChange


class InvariantViolation(AssertionError):
    """The event logs break a promise of the membership contract."""


@dataclass
class Log:
    """One process's events (a restart starts a new log) and, per generation it
    installed, the incarnation of every member."""

    node: int
    events: list
    incarnations: dict[int, dict[int, int]]

    @classmethod
    def of(cls, node: int, ms: MembershipService) -> Log:
        return cls(node, ms.events, getattr(ms, "installed_incarnations", {}))

    def __iter__(self):
        return iter((self.node, self.events))


def view_key(e: ViewChange) -> tuple:
    return (e.view.members, e.view.quorate, e.joined, e.left)


def check_generations_grow(logs: list[Log]) -> None:
    for node, events in logs:
        gens = [e.view.generation for e in events if isinstance(e, ViewChange)]
        if gens != sorted(set(gens)):
            raise InvariantViolation(f"node {node}: generations must only grow: {gens}")


def check_one_view_per_generation(logs: list[Log]) -> None:
    """Installs of one generation agree (members, quorum, joined, left) whenever they
    share a member (a process: node and incarnation). Quorate views are not compared
    outright: when every node has restarted, nobody remembers the generations and the
    count starts again."""
    seen: dict[int, list[tuple[int, ViewChange, set]]] = {}
    for lg in logs:
        for e in lg.events:
            if not isinstance(e, ViewChange):
                continue
            node = lg.node
            # members as processes: a restarted node is another process
            procs = set(lg.incarnations.get(e.view.generation, {}).items())
            for other_node, other, other_procs in seen.get(e.view.generation, []):
                if procs & other_procs and view_key(e) != view_key(other):
                    raise InvariantViolation(
                        f"generation {e.view.generation}: node {node} installed "
                        f"{sorted(e.view.members)} (joined {sorted(e.joined)} left "
                        f"{sorted(e.left)}), node {other_node} installed "
                        f"{sorted(other.view.members)} (joined {sorted(other.joined)} "
                        f"left {sorted(other.left)})")
            seen.setdefault(e.view.generation, []).append((node, e, procs))


def check_fenced_after_its_view(logs: list[Log]) -> None:
    for node, events in logs:
        current = None
        for e in events:
            if isinstance(e, ViewChange):
                current = e.view
            elif isinstance(e, Fenced):
                if current is None or current.generation != e.generation:
                    raise InvariantViolation(f"node {node}: {e} outside its view")
                if e.nodes & current.members:
                    raise InvariantViolation(f"node {node}: {e} fences a member")


def history_before(events: list, index: int) -> tuple:
    """What a node delivered since its previous view, up to the view at `index`."""
    k = index - 1
    while k >= 0 and not isinstance(events[k], ViewChange):
        k -= 1
    if k < 0:
        return ()
    return tuple((e.view.generation, view_key(e)) if isinstance(e, ViewChange) else e
                 for e in events[k:index])


def check_same_path_into_each_view(logs: list[Log]) -> None:
    """Members that carry on together into a view (not joining it) came from the same
    previous view and delivered the same events on the way: the same events in the
    same order on every member."""
    paths: dict[tuple, tuple[int, tuple]] = {}
    for node, events in logs:
        for k, e in enumerate(events):
            if not isinstance(e, ViewChange) or node in e.joined:
                continue
            path = history_before(events, k)
            if not path:
                continue
            # disjoint partitions may each install a view of one generation
            first = paths.setdefault((e.view.generation, view_key(e)), (node, path))
            if first[1] != path:
                raise InvariantViolation(
                    f"view {e.view.generation}: node {node} arrived by {path}, "
                    f"node {first[0]} by {first[1]}")


def check_invariants(logs: list[Log]) -> None:
    check_generations_grow(logs)
    check_one_view_per_generation(logs)
    check_fenced_after_its_view(logs)
    check_same_path_into_each_view(logs)


async def churn(sim: Sim, rng: random.Random, steps: int) -> list[Log]:
    ids = sim.ids
    logs: list[Log] = []
    dead: set[int] = set()
    for _ in range(steps):
        await trio.sleep(rng.uniform(0.2, 5.0))
        act = rng.random()
        live = [i for i in ids if i not in dead]
        if act < 0.2 and len(live) > 2:
            victim = rng.choice(live)
            logs.append(Log.of(victim, sim.nodes[victim]))
            sim.kill(victim)
            dead.add(victim)
        elif act < 0.4 and dead:
            n = rng.choice(sorted(dead))
            await sim.start(n)
            dead.discard(n)
        elif act < 0.55:
            a, b = rng.sample(ids, 2)
            sim.net.cut(a, b)
        elif act < 0.65:
            sim.isolate(rng.choice(ids))
        else:
            sim.heal_all()
        for i in ids:   # an expelled node restarts clean, as it must
            if i not in dead and sim.nodes[i].state == EXPELLED and rng.random() < 0.5:
                logs.append(Log.of(i, sim.nodes[i]))
                sim.kill(i)
                await sim.start(i)
    sim.heal_all()
    for i in ids:
        if i in dead or sim.nodes[i].state == EXPELLED:
            if i not in dead:
                logs.append(Log.of(i, sim.nodes[i]))
                sim.kill(i)
            await sim.start(i)

    await converge(sim, logs, 20 * DETECT)
    logs += [Log.of(i, sim.nodes[i]) for i in ids]
    return logs


async def converge(sim: Sim, logs: list[Log], timeout: float) -> None:
    """Wait for one quorate view of every node."""
    ids = sim.ids
    with trio.fail_after(timeout):
        while not (sim.agreed(ids, set(ids)) and sim.nodes[ids[0]].view.quorate):
            for i in ids:     # expelled while converging: restart clean, as the node would
                if sim.nodes[i].state == EXPELLED:
                    logs.append(Log.of(i, sim.nodes[i]))
                    sim.kill(i)
                    await sim.start(i)
            await trio.sleep(0.1)


@contextlib.contextmanager
def deadlines_in_order() -> Iterator[None]:
    """trio orders cancel scopes whose deadlines are equal by id(scope), by where they
    happen to sit in memory: a seed's run then depended on what the process ran before
    (seed 365 of the jitter soak gave another run alone than after seeds 320-364, and
    failed only after them; CI failed seed 0 of the jitter test, which passed alone).
    Within this, equal deadlines expire in the order they were set."""
    from trio._core import _run

    deadlines = getattr(_run, "Deadlines", None)
    if deadlines is None or not hasattr(deadlines, "add"):
        yield        # another trio: runs are only as repeatable as it makes them
        return
    original = deadlines.add
    order = itertools.count()

    def add(self, deadline: float, cancel_scope: trio.CancelScope) -> None:
        heapq.heappush(self._heap, (deadline, next(order), cancel_scope))
        self._active += 1

    deadlines.add = add
    try:
        yield
    finally:
        deadlines.add = original


def run_seed(seed: int, steps: int, jitter: float = 0.0, loss: float = 0.0) -> None:
    """Deterministic for a seed: virtual time, seeded incarnations and pauses, trio's
    scheduler (it shuffles runnable tasks with its own RNG; seeding it makes a failing
    seed replay exactly) and equal deadlines expiring in the order they were set."""
    ids = [1, 2, 3, 4, 5]
    random.seed(seed)
    trio._core._run._r.seed(seed)

    @mock_trio
    async def main():
        async def body(sim):
            for i in ids:
                await sim.start(i)
            # a lost answer makes a suspect (left out, so expelled): forming takes longer
            logs: list[Log] = []
            await converge(sim, logs, 60 if loss else 10)
            logs += await churn(sim, random.Random(seed), steps)
            check_invariants(logs)
            assert all(sim.nodes[i].state == MEMBER for i in ids)
        await with_sim(ids, body, jitter=jitter, seed=seed, loss=loss)

    with deadlines_in_order():
        main()


@pytest.mark.parametrize("seed", range(6))
def test_churn(seed):
    run_seed(seed, steps=40)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(100, 300))
def test_churn_soak(seed):
    run_seed(seed, steps=150)


@pytest.mark.parametrize("seed", range(3))
def test_churn_with_message_jitter(seed):
    """Every message is delayed up to 0.4 s (heartbeat 0.5 s): competing proposals."""
    run_seed(seed, steps=40, jitter=0.4)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(300, 400))
def test_churn_with_message_jitter_soak(seed):
    run_seed(seed, steps=150, jitter=0.4)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(400, 450))
def test_churn_with_message_jitter_and_loss_soak(seed):
    """Jitter, and 2% of all messages lost (no retransmission above the transport)."""
    run_seed(seed, steps=150, jitter=0.4, loss=0.02)
