"""Tier 2 torture: random locking over the in-memory transport, an independent
checker, nodes crashed mid-run (tests/torture.py)."""

from __future__ import annotations

import pytest
import trio
from torture import Checker, memory_torture
from trioutil import trio_test

from clusterfs.dlm import toss
from clusterfs.dlm.interface import Mode


def test_checker_catches_overlap() -> None:
    c = Checker()
    c.granted(1, 0, "r", Mode.PR, (0, 10))
    c.granted(2, 0, "r", Mode.PR, (5, 15))
    c.granted(3, 0, "r", Mode.EX, (20, 30))
    assert not c.violations
    c.granted(4, 0, "r", Mode.PW, (10, 10))   # overlaps both PR holds
    assert len(c.violations) == 2
    c.releasing(1, 0)
    c.releasing(4, 0)
    c.converted(2, 0, Mode.EX)
    assert len(c.violations) == 2
    c.granted(1, 1, "r", Mode.NL, (0, 100))   # NL conflicts with nothing
    c.granted(1, 2, "r", Mode.CR, (15, 15))   # CR vs EX: conflict
    assert len(c.violations) == 3


@trio_test
async def test_memory_torture_with_crashes() -> None:
    res = await memory_torture([1, 2, 3, 4], seconds=6, kill_rounds=2, seed=7)
    assert res.checker.violations == []
    assert res.lost_locks == []
    assert res.kills == 2
    assert res.ops > 200, res


@trio_test
async def test_memory_torture_with_crashes_and_batches() -> None:
    """The same with every node batching all the time: what a node decides reaches
    each other node in order, in DLM_BATCHes, across crashes and recoveries."""
    res = await memory_torture([1, 2, 3, 4], seconds=6, kill_rounds=2, seed=7,
                               batching=True)
    assert res.checker.violations == []
    assert res.lost_locks == [] and res.errors == []
    assert res.kills == 2
    assert res.ops > 200 and res.batches > 50, res


def test_memory_torture_with_idle_resources_removed(monkeypatch) -> None:
    """Masters free idle resources (DLM_REMOVE) all the time, racing lookups
    and requests from nodes that still cache them as master, and crashes."""
    monkeypatch.setattr(toss, "TOSS_SECONDS", 0.1)
    res = trio.run(lambda: memory_torture([1, 2, 3], seconds=6, kill_rounds=1, seed=23,
                                          resources=20, await_removal=True))
    assert res.checker.violations == [] and res.lost_locks == [] and res.errors == []
    assert res.ops > 200 and res.removed > 0, res


@pytest.mark.slow
@trio_test
async def test_memory_torture_long() -> None:
    res = await memory_torture([1, 2, 3, 4, 5], seconds=60, kill_rounds=10, seed=11,
                               workers_per_node=4)
    assert res.checker.violations == [] and res.lost_locks == []


@trio_test
async def test_memory_torture_with_partitions_and_merges() -> None:
    """Each round one node freezes (cut off, still locking what it can) as another
    dies, the third goes on alone without quorum, and the frozen one wakes and merges
    with it, at random dropped and merged again: what the merges resynchronise must
    leave no two incompatible holds at once and no hold lost (the real mounts' case
    is tests/test_cluster_quorum.py)."""
    res = await memory_torture([1, 2, 3], seconds=6, kill_rounds=4, seed=3, merges="cut")
    assert res.checker.violations == [] and res.lost_locks == [] and res.errors == []
    assert res.kills == 4 and res.ops > 200, res
