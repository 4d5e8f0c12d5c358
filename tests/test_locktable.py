"""Tier 1: the C lock table (native/locktable.c) through its wrapper."""

from __future__ import annotations

import itertools

import pytest

from clusterfs.dlm.interface import (
    FULL_RANGE,
    ConversionDeadlock,
    Mode,
    compatible,
    is_down_conversion,
)
from clusterfs.dlm.locktable import EventType, LockTable, Queue, TableStats
from clusterfs.errors import LockError, WouldBlock

R = b"res"


@pytest.fixture
def t() -> LockTable:
    table = LockTable()
    yield table
    table.close()


def grants(t: LockTable) -> list[int]:
    return [e.lkid for e in t.events() if e.type == EventType.GRANT]


@pytest.mark.parametrize("a,b", list(itertools.product(Mode, Mode)))
def test_compat_matrix(t: LockTable, a: Mode, b: Mode) -> None:
    assert t.request(R, 1, 1, a, FULL_RANGE)
    assert t.request(R, 2, 2, b, FULL_RANGE, try_=False) == compatible(a, b)


def test_matrix_is_the_standard_one() -> None:
    ex_ok = [m for m in Mode if compatible(Mode.EX, m)]
    assert ex_ok == [Mode.NL]
    assert compatible(Mode.PR, Mode.PR) and not compatible(Mode.PR, Mode.CW)
    assert compatible(Mode.CW, Mode.CW) and not compatible(Mode.PW, Mode.PW)
    assert compatible(Mode.CR, Mode.PW) and not compatible(Mode.CR, Mode.EX)
    assert is_down_conversion(Mode.EX, Mode.PR) and not is_down_conversion(Mode.PR, Mode.CW)


def test_ranges(t: LockTable) -> None:
    assert t.request(R, 1, 1, Mode.EX, (0, 99))
    assert t.request(R, 2, 2, Mode.EX, (100, 199))          # disjoint: both granted
    assert not t.request(R, 3, 3, Mode.PR, (99, 100))       # touches both
    with pytest.raises(WouldBlock):
        t.request(R, 4, 3, Mode.EX, (150, 150), try_=True)
    assert t.request(R, 5, 3, Mode.EX, (200, 2**64 - 1))
    t.unlock(1)
    assert grants(t) == []                                  # still blocked by lock 2
    t.unlock(2)
    assert grants(t) == [3]


def test_try_does_not_queue(t: LockTable) -> None:
    t.request(R, 1, 1, Mode.EX, FULL_RANGE)
    with pytest.raises(WouldBlock):
        t.request(R, 2, 2, Mode.NL + 1, FULL_RANGE, try_=True)
    assert [i.lkid for i in t.dump(R)] == [1]
    assert t.statistics().locks == 1


def test_fifo_no_starvation(t: LockTable) -> None:
    assert t.request(R, 1, 1, Mode.PR, FULL_RANGE)
    assert not t.request(R, 2, 2, Mode.EX, FULL_RANGE)
    # a new PR would be compatible with the holder but must not overtake the EX waiter
    assert not t.request(R, 3, 3, Mode.PR, FULL_RANGE)
    # ... unless it does not conflict with the waiter (other range)
    t.unlock(1)
    assert grants(t) == [2]
    t.unlock(2)
    assert grants(t) == [3]


def test_fifo_ignores_nonoverlapping_waiter(t: LockTable) -> None:
    t.request(R, 1, 1, Mode.EX, (0, 10))
    assert not t.request(R, 2, 2, Mode.EX, (0, 10))
    assert t.request(R, 3, 3, Mode.EX, (11, 20))


def test_blocking_events(t: LockTable) -> None:
    t.request(R, 1, 1, Mode.PR, FULL_RANGE)
    t.request(R, 2, 2, Mode.PR, FULL_RANGE)
    t.request(R, 3, 3, Mode.EX, FULL_RANGE)
    ev = t.events()
    assert {(e.type, e.lkid, e.mode) for e in ev} == {
        (EventType.BAST, 1, Mode.EX), (EventType.BAST, 2, Mode.EX)}
    t.request(R, 4, 4, Mode.EX, FULL_RANGE)
    assert t.events() == []        # already told about an EX waiter


def test_convert_up_down_and_lvb(t: LockTable) -> None:
    assert t.request(R, 1, 1, Mode.EX, FULL_RANGE)
    assert t.convert(1, Mode.PR, lvb=b"hello")              # down: LVB stored
    assert t.lock_lvb(1)[0].rstrip(b"\0") == b"hello"
    assert t.request(R, 2, 2, Mode.PR, FULL_RANGE)
    assert not t.convert(1, Mode.EX)                        # up: waits for 2
    assert [i.queue for i in t.dump(R)] == [Queue.GRANTED, Queue.CONVERTING]
    # a new PR request must not overtake the conversion
    assert not t.request(R, 3, 3, Mode.PR, FULL_RANGE)
    t.unlock(2)
    assert grants(t) == [1]
    t.unlock(1, lvb=b"world")
    assert grants(t) == [3]
    lvb, seq, valid = t.lock_lvb(3)
    assert lvb.rstrip(b"\0") == b"world" and seq == 2 and valid


def test_pr_holder_lvb_not_stored(t: LockTable) -> None:
    t.request(R, 1, 1, Mode.PR, FULL_RANGE)
    t.unlock(1, lvb=b"ignored")
    assert t.resource_lvb(R) == (bytes(32), 0, True)


def test_conversion_deadlock(t: LockTable) -> None:
    t.request(R, 1, 1, Mode.PR, FULL_RANGE)
    t.request(R, 2, 2, Mode.PR, FULL_RANGE)
    assert not t.convert(1, Mode.EX)
    with pytest.raises(ConversionDeadlock):
        t.convert(2, Mode.EX)
    info = t.lock_info(2)
    assert info.queue == Queue.GRANTED and info.grmode == Mode.PR
    t.unlock(2)
    assert grants(t) == [1]


def test_three_way_conversion_deadlock(t: LockTable) -> None:
    for i in (1, 2, 3):
        t.request(R, i, i, Mode.PR, FULL_RANGE)
    assert not t.convert(1, Mode.EX)
    with pytest.raises(ConversionDeadlock):
        t.convert(2, Mode.EX)
    with pytest.raises(ConversionDeadlock):
        t.convert(3, Mode.PW)
    t.unlock(2)
    t.unlock(3)
    assert grants(t) == [1]


def test_convert_queue_is_fifo(t: LockTable) -> None:
    """A later conversion that becomes grantable first still waits behind an
    older conversion its wanted mode clashes with (the old table granted it)."""
    t.request(R, 1, 1, Mode.CR, FULL_RANGE)     # H
    t.request(R, 2, 2, Mode.PR, FULL_RANGE)     # G
    t.request(R, 3, 3, Mode.NL, FULL_RANGE)     # A
    t.request(R, 4, 4, Mode.NL, FULL_RANGE)     # B
    assert not t.convert(3, Mode.EX)            # A waits for H and G
    assert not t.convert(4, Mode.CW)            # B waits for G (and behind A)
    t.events()
    t.unlock(2)                                 # B's only blocker goes ...
    assert grants(t) == []                      # ... but A is older: B waits
    t.unlock(1)
    assert grants(t) == [3]
    t.convert(3, Mode.NL)
    assert grants(t) == [4]


def test_convert_queue_order_is_range_aware(t: LockTable) -> None:
    """Conversions of disjoint ranges do not queue behind each other."""
    t.request(R, 1, 1, Mode.PR, (0, 10))
    t.request(R, 2, 2, Mode.PR, (20, 30))
    t.request(R, 3, 3, Mode.NL, (0, 10))
    t.request(R, 4, 4, Mode.NL, (20, 30))
    t.request(R, 5, 5, Mode.NL, (5, 25))
    assert not t.convert(3, Mode.EX)            # waits for 1
    assert not t.convert(4, Mode.EX)            # waits for 2; not behind 3
    assert not t.convert(5, Mode.EX)            # waits for 1 and 2, behind 3 and 4
    t.events()
    t.unlock(2)
    assert grants(t) == [4]
    t.unlock(1)
    assert grants(t) == [3]                     # 5 still waits for 3 and 4
    t.convert(3, Mode.NL)
    t.convert(4, Mode.NL)
    assert grants(t) == [5]


def test_in_place_conversion_passes_the_queue(t: LockTable) -> None:
    """Linux without QUECVT: a conversion every holder allows is granted at once."""
    t.request(R, 1, 1, Mode.PR, FULL_RANGE)
    t.request(R, 2, 2, Mode.NL, FULL_RANGE)
    t.request(R, 3, 3, Mode.NL, FULL_RANGE)
    assert not t.convert(2, Mode.EX)
    assert t.convert(3, Mode.PR)
    assert t.convert(3, Mode.NL)                # down: always at once


def test_deadlock_of_queue_order(t: LockTable) -> None:
    """Linux's conversion_deadlock_detect part 2: a conversion whose granted
    mode blocks an OLDER queued conversion it would queue behind fails."""
    t.request(R, 1, 1, Mode.PR, FULL_RANGE)     # H
    t.request(R, 2, 2, Mode.NL, FULL_RANGE)     # A
    t.request(R, 3, 3, Mode.CR, FULL_RANGE)     # B
    assert not t.convert(2, Mode.EX)            # A waits for H (and B's CR)
    with pytest.raises(ConversionDeadlock):
        t.convert(3, Mode.PW)                   # behind A, and A waits for its CR
    assert t.lock_info(3).queue == Queue.GRANTED and t.lock_info(3).grmode == Mode.CR
    t.unlock(3)
    t.unlock(1)
    assert grants(t) == [2]


def test_recovered_convert_queue_granted_in_any_order(t: LockTable) -> None:
    """After recovery NL->EX may sit ahead of PR->EX (owners re-send in their
    own order): that must not deadlock on order."""
    t.recover_lock(R, 1, 1, Mode.NL, Mode.EX, FULL_RANGE)
    t.recover_lock(R, 2, 2, Mode.PR, Mode.EX, FULL_RANGE)
    assert t.regrant(R) == 1 and grants(t) == [2]
    t.unlock(2)
    assert grants(t) == [1]
    # drained: the queue is ordered again
    t.convert(1, Mode.NL)
    t.request(R, 3, 3, Mode.PR, FULL_RANGE)
    t.request(R, 4, 4, Mode.CR, FULL_RANGE)
    assert not t.convert(1, Mode.EX)
    with pytest.raises(ConversionDeadlock):
        t.convert(4, Mode.PW)


def test_a_conversion_deadlock_recovery_rebuilt_is_refused_at_regrant(
        t: LockTable) -> None:
    """Two PR->EX conversions re-sent by recovery: no convert call saw the second, so
    regrant refuses the newest (EV_DEADLOCK, back to PR) and the other is granted once
    its owner lets PR go (an in-process cluster hung there after a merge)."""
    t.recover_lock(R, 1, 1, Mode.PR, Mode.EX, FULL_RANGE)
    t.recover_lock(R, 2, 2, Mode.PR, Mode.EX, FULL_RANGE)
    t.recover_lock(R, 3, 3, Mode.NL, None, FULL_RANGE)
    assert t.regrant(R) == 0
    events = t.events()
    assert [(e.type, e.lkid, e.mode) for e in events if e.type != EventType.BAST] == \
        [(EventType.DEADLOCK, 2, Mode.PR)]
    assert {e.lkid for e in events if e.type == EventType.BAST} == {2}
    assert [(i.lkid, i.queue, i.grmode) for i in t.dump(R)] == [
        (3, Queue.GRANTED, Mode.NL), (2, Queue.GRANTED, Mode.PR),
        (1, Queue.CONVERTING, Mode.PR)]
    t.convert(2, Mode.NL)
    assert grants(t) == [1]


def test_regrant_leaves_a_recovered_queue_without_a_cycle_alone(t: LockTable) -> None:
    t.recover_lock(R, 1, 1, Mode.PR, Mode.EX, FULL_RANGE)
    t.recover_lock(R, 2, 2, Mode.PR, None, FULL_RANGE)
    assert t.regrant(R) == 0
    assert not [e for e in t.events() if e.type == EventType.DEADLOCK]


def test_idle_resources_toss_list(t: LockTable) -> None:
    t.set_epoch(1)
    t.request(b"a", 1, 1, Mode.EX, FULL_RANGE, try_=True)
    t.request(b"b", 2, 1, Mode.EX, FULL_RANGE)
    t.unlock(1, lvb=b"kept")
    assert t.statistics().idle == 1
    assert t.idle_resource(1) is None           # idle since epoch 1: not before 1
    t.set_epoch(2)
    t.unlock(2)
    t.request(b"a", 3, 1, Mode.PR, FULL_RANGE)  # back in use: off the toss list
    assert t.lock_lvb(3)[0].rstrip(b"\0") == b"kept"
    t.unlock(3)                                 # idle again, now in epoch 2
    assert t.drop_idle(3) == [b"b", b"a"]       # oldest first
    assert t.statistics() == TableStats(0, 0, 0)
    t.set_resource_lvb(b"c", b"x", 1, True)     # made without a lock: idle at once
    assert t.drop_idle(3) == [b"c"]
    long_name = b"n" * 1000
    t.request(long_name, 4, 1, Mode.NL, FULL_RANGE)
    t.unlock(4)
    assert t.drop_idle(3) == [long_name]


def test_cancel(t: LockTable) -> None:
    t.request(R, 1, 1, Mode.EX, FULL_RANGE)
    t.request(R, 2, 2, Mode.EX, FULL_RANGE)
    t.request(R, 3, 3, Mode.PR, (5, 5))
    t.request(R, 4, 4, Mode.PR, (7, 7))
    assert t.cancel(2)
    assert not t.cancel(1)                                  # granted: nothing to cancel
    t.unlock(1)
    assert sorted(grants(t)) == [3, 4]
    with pytest.raises(LockError):
        t.cancel(2)


def test_cancel_conversion(t: LockTable) -> None:
    t.request(R, 1, 1, Mode.PR, FULL_RANGE)
    t.request(R, 2, 2, Mode.PR, FULL_RANGE)
    t.convert(1, Mode.EX)
    assert t.cancel(1)
    assert t.lock_info(1).grmode == Mode.PR and t.lock_info(1).queue == Queue.GRANTED


def test_purge_invalidates_lvb_and_regrants(t: LockTable) -> None:
    t.request(R, 1, 7, Mode.PW, FULL_RANGE)
    t.request(R, 2, 2, Mode.PR, FULL_RANGE)
    t.request(b"other", 3, 7, Mode.PR, FULL_RANGE)
    t.events()
    assert t.purge_node(7) == 2
    assert t.regrant(R) == 1 and grants(t) == [2]
    assert t.lock_lvb(2)[2] is False
    assert t.resource_lvb(b"other")[2] is True


def test_recover_lock_and_regrant(t: LockTable) -> None:
    t.recover_lock(R, 1, 1, Mode.PR, None, FULL_RANGE)
    t.recover_lock(R, 2, 2, Mode.PR, Mode.EX, FULL_RANGE)
    t.recover_lock(R, 3, 3, None, Mode.PR, FULL_RANGE)
    assert [i.queue for i in t.dump(R)] == [Queue.GRANTED, Queue.CONVERTING, Queue.WAITING]
    assert t.regrant(R) == 0
    t.unlock(1)
    assert grants(t) == [2]
    t.drop_resource(R)
    assert t.statistics().resources == 0 and t.statistics().locks == 0


def test_errors(t: LockTable) -> None:
    t.request(R, 1, 1, Mode.EX, FULL_RANGE)
    with pytest.raises(LockError):
        t.request(R, 1, 1, Mode.EX, FULL_RANGE)             # duplicate id
    with pytest.raises(LockError):
        t.unlock(99)
    with pytest.raises(LockError):
        t.request(R, 5, 1, Mode.EX, (10, 5))                # bad range


def test_many_resources_grow_tables(t: LockTable) -> None:
    for i in range(5000):
        assert t.request(b"r%d" % i, i + 1, 1, Mode.EX, FULL_RANGE)
    assert t.statistics().resources == 5000 and t.statistics().locks == 5000
    for i in range(5000):
        t.unlock(i + 1)
    assert t.statistics().locks == 0


def test_random_against_model(t: LockTable) -> None:
    """Random ops: at every moment the granted set is pairwise compatible."""
    import random

    rng = random.Random(3)
    live: dict[int, str] = {}
    nxt = 1
    for _ in range(3000):
        op = rng.random()
        if op < 0.5 or not live:
            a = rng.randrange(0, 50)
            rng_ = (a, a + rng.randrange(0, 20))
            try:
                t.request(R, nxt, 1, Mode(rng.randrange(6)), rng_, try_=rng.random() < 0.2)
                live[nxt] = "x"
            except WouldBlock:
                pass
            nxt += 1
        else:
            lk = rng.choice(list(live))
            info = t.lock_info(lk)
            if info.queue == Queue.WAITING:
                t.cancel(lk)
                del live[lk]
            elif info.queue == Queue.CONVERTING and rng.random() < 0.3:
                t.cancel(lk)
            elif info.queue == Queue.GRANTED and rng.random() < 0.5:
                try:
                    t.convert(lk, Mode(rng.randrange(6)), try_=rng.random() < 0.1)
                except (ConversionDeadlock, WouldBlock):
                    pass
            elif info.queue == Queue.GRANTED:
                t.unlock(lk)
                del live[lk]
        t.events()
        held = [i for i in t.dump(R) if i.grmode is not None]
        for a, b in itertools.combinations(held, 2):
            overlap = a.range[0] <= b.range[1] and b.range[0] <= a.range[1]
            assert not overlap or compatible(a.grmode, b.grmode), (a, b)
        _assert_nothing_grantable_left(t.dump(R))


def _clash(a_mode: Mode, a, b_mode: Mode, b) -> bool:
    return a.range[0] <= b.range[1] and b.range[0] <= a.range[1] \
        and not compatible(a_mode, b_mode)


def _assert_nothing_grantable_left(infos) -> None:
    """The queue model: a queued conversion waits for a holder or an older
    clashing conversion; a waiter for a holder, a conversion or an older waiter."""
    holders = [i for i in infos if i.grmode is not None]
    converting = [i for i in infos if i.queue == Queue.CONVERTING]
    waiting = [i for i in infos if i.queue == Queue.WAITING]
    for n, c in enumerate(converting):
        assert any(h is not c and _clash(c.rqmode, c, h.grmode, h) for h in holders) or \
            any(_clash(c.rqmode, c, o.rqmode, o) for o in converting[:n]), c
    for n, w in enumerate(waiting):
        assert any(_clash(w.rqmode, w, h.grmode, h) for h in holders) or \
            any(_clash(w.rqmode, w, o.rqmode, o) for o in converting + waiting[:n]), w
