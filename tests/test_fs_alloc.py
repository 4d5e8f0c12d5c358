"""A resource group's search for free blocks, in memory (no device)."""

from clusterfs.format.rgrp import RgrpHeader, set_range
from clusterfs.fs.alloc import ResourceGroup


def _group(length: int = 4096, used_at_start: int = 2) -> ResourceGroup:
    bits = bytearray(-(-length // 8))
    set_range(bits, 0, used_at_start)                  # header and bitmap
    header = RgrpHeader(index=0, first=1000, length=length, bitmap_blocks=1, free=0)
    return ResourceGroup(header, bits)


def _take_one(group: ResourceGroup, goal: int = 0) -> int:
    found = group.find_run(goal, 1)
    assert found is not None
    start, count = found
    group.take(start, count)
    return start


def test_blocks_aimed_at_the_start_come_in_order_and_the_search_skips_what_is_full():
    group = _group()
    taken = [_take_one(group) for _ in range(3000)]
    assert taken == list(range(2, 3002))
    assert group.full_below == 3001 // 8                # (its search starts there now)
    assert group.free == 4096 - 3002


def test_a_block_given_back_or_out_of_quarantine_below_the_search_start_is_found_again():
    group = _group()
    for _ in range(2000):
        _take_one(group)
    group.give_back(500, 1)                             # reserved, never used
    assert _take_one(group) == 500
    group.release(77, 3)                                # freed: quarantined
    assert _take_one(group) == 2002                     # not before the checkpoint
    group.end_quarantine(1)
    assert [_take_one(group) for _ in range(4)] == [77, 78, 79, 2003]


def test_a_goal_past_the_full_start_is_still_preferred():
    group = _group()
    for _ in range(100):
        _take_one(group)
    assert _take_one(group, goal=3000) == 3000
    assert _take_one(group) == 102
