"""CollectorWatch: full collections are timed and their survivors frozen, so the next
full collection walks only what was made since (its pause no longer grows with the
caches); a long one is said once at info."""

from __future__ import annotations

import gc
import logging

import pytest

from clusterfs.node import collector
from clusterfs.node.collector import CollectorWatch


@pytest.fixture
def watch():
    w = CollectorWatch()
    w.install()
    try:
        yield w
    finally:
        w.uninstall()
        gc.unfreeze()                 # leave this test process as it was


class Node:
    def __init__(self) -> None:
        self.me = self                # a cycle: only the collector frees it


def test_full_collection_timed_and_survivors_frozen(watch):
    kept = [Node() for _ in range(1000)]
    frozen_before = gc.get_freeze_count()
    gc.collect(2)
    assert watch.full == 1 and watch.last > 0 and watch.longest == watch.last
    assert gc.get_freeze_count() >= frozen_before + len(kept)
    # what was frozen is not walked again: a second full collection sees only new objects
    before = len(gc.get_objects(generation=2))
    gc.collect(2)
    assert watch.full == 2
    assert before < len(kept)
    assert watch.statistics()["full_collections"] == 2


def test_garbage_made_after_a_freeze_is_still_collected(watch):
    gc.collect(2)
    for _ in range(100):
        Node()                        # unreachable cycles, made after the freeze
    freed = watch.freed
    in_cycles = watch.statistics()["in_cycles_by_generation"]
    gc.collect(2)
    assert watch.freed - freed >= 100
    # status shows what each generation found in cycles (the sources are ours to fix)
    assert watch.statistics()["in_cycles_by_generation"][2] - in_cycles[2] >= 100


def test_young_collections_are_not_counted(watch):
    gc.collect(0)
    gc.collect(1)
    assert watch.full == 0


def test_a_long_pause_is_said_once_a_minute(watch, monkeypatch, caplog):
    monkeypatch.setattr(collector, "PAUSE_LOGGED", 0.0)
    caplog.set_level(logging.INFO, logger="clusterfs.node.collector")
    gc.collect(2)
    gc.collect(2)
    said = [r for r in caplog.records if "full garbage collection" in r.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.INFO


def test_frozen_cycles_are_reclaimed_by_the_periodic_full_walk(watch, monkeypatch):
    """A cycle alive at a freeze and dropped afterwards is invisible to the collector
    until a full collection walks everything again (every UNFREEZE_EVERY seconds)."""
    kept = [Node() for _ in range(200)]
    gc.collect(2)                                  # survivors: frozen
    del kept                                       # now garbage, but frozen
    freed = watch.freed
    gc.collect(2)
    assert watch.freed - freed < 200               # not seen
    monkeypatch.setattr(collector, "UNFREEZE_EVERY", 0.0)
    gc.collect(2)                                  # a full walk: unfrozen first
    assert watch.freed - freed >= 200
    assert watch.unfreezes == 1 and watch.statistics()["full_walks"] == 1
