"""Randomized churn over the in-memory transport in virtual time: kills, restarts,
link cuts, isolations and heals; then invariants over every node's event log and
convergence once the network is whole again."""

from __future__ import annotations

import random

import pytest
import trio
from test_membership import DETECT, Sim, mock_trio, with_sim

from clusterfs.membership.service import EXPELLED, MEMBER
from clusterfs.membership.view import Fenced, ViewChange


def check_invariants(logs: list[list]) -> None:
    quorate: dict[int, frozenset[int]] = {}
    for events in logs:
        gens = [e.view.generation for e in events if isinstance(e, ViewChange)]
        assert gens == sorted(set(gens)), f"generations must only grow: {gens}"
        current = None
        for e in events:
            if isinstance(e, ViewChange):
                current = e.view
                if e.view.quorate:
                    prev = quorate.setdefault(e.view.generation, e.view.members)
                    assert prev == e.view.members, (
                        f"two quorate views with generation {e.view.generation}: "
                        f"{sorted(prev)} and {sorted(e.view.members)}")
            elif isinstance(e, Fenced):
                assert current is not None and current.generation == e.generation
                assert not (e.nodes & current.members)


async def churn(sim: Sim, rng: random.Random, steps: int) -> list[list]:
    ids = sim.ids
    logs: list[list] = []
    dead: set[int] = set()
    for _ in range(steps):
        await trio.sleep(rng.uniform(0.2, 5.0))
        act = rng.random()
        live = [i for i in ids if i not in dead]
        if act < 0.2 and len(live) > 2:
            victim = rng.choice(live)
            logs.append(sim.nodes[victim].events)
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
                logs.append(sim.nodes[i].events)
                sim.kill(i)
                await sim.start(i)
    sim.heal_all()
    for i in ids:
        if i in dead or sim.nodes[i].state == EXPELLED:
            if i not in dead:
                logs.append(sim.nodes[i].events)
                sim.kill(i)
            await sim.start(i)

    with trio.fail_after(20 * DETECT):
        while not (sim.agreed(ids, set(ids)) and sim.nodes[ids[0]].view.quorate):
            for i in ids:     # expelled while converging: restart clean, as the node would
                if sim.nodes[i].state == EXPELLED:
                    logs.append(sim.nodes[i].events)
                    sim.kill(i)
                    await sim.start(i)
            await trio.sleep(0.1)
    logs += [sim.nodes[i].events for i in ids]
    return logs


def run_seed(seed: int, steps: int, jitter: float = 0.0) -> None:
    """Deterministic for a seed: virtual time, seeded incarnations and pauses."""
    ids = [1, 2, 3, 4, 5]
    random.seed(seed)

    @mock_trio
    async def main():
        async def body(sim):
            for i in ids:
                await sim.start(i)
            await sim.until(lambda: sim.agreed(ids, set(ids)), 10)
            logs = await churn(sim, random.Random(seed), steps)
            check_invariants(logs)
            assert all(sim.nodes[i].state == MEMBER for i in ids)
        await with_sim(ids, body, jitter=jitter, seed=seed)

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
