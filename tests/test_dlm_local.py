"""Tier 1: LocalLockService, the one-node LockService, on the C lock table."""

from __future__ import annotations

import pytest
import trio
import trio.testing
from trioutil import trio_test

from clusterfs.dlm import local
from clusterfs.dlm.interface import ConversionDeadlock, Mode
from clusterfs.dlm.local import LocalLockService
from clusterfs.errors import LockError, WouldBlock

R = ("inode", 1)


@trio_test
async def test_waiter_granted_in_order_with_blocking_callback_and_lvb() -> None:
    svc = LocalLockService()
    blocked: list[Mode] = []
    ex = await svc.lock(R, Mode.EX, on_blocking=blocked.append)
    ex.lvb = b"v1"
    got: list[str] = []

    async def take(tag: str, mode: Mode) -> None:
        lk = await svc.lock(R, mode)
        got.append(tag)
        assert lk.lvb.rstrip(b"\0") == b"v1"
        await svc.unlock(lk)

    async with trio.open_nursery() as n:
        n.start_soon(take, "pw", Mode.PW)
        await trio.testing.wait_all_tasks_blocked()
        n.start_soon(take, "pr", Mode.PR)       # must not overtake the PW waiter
        await trio.testing.wait_all_tasks_blocked()
        assert blocked == [Mode.PW] and got == []
        await svc.unlock(ex)
    assert got == ["pw", "pr"]
    assert svc.statistics()["waited"] == 2


@trio_test
async def test_try_ranges_and_errors() -> None:
    svc = LocalLockService()
    a = await svc.lock(R, Mode.EX, range=(0, 9))
    b = await svc.lock(R, Mode.EX, range=(10, 19))      # disjoint: granted
    with pytest.raises(WouldBlock):
        await svc.lock(R, Mode.PR, range=(5, 15), try_=True)
    c = await svc.lock(R, Mode.NL, range=(5, 15))
    with pytest.raises(WouldBlock):
        await svc.convert(c, Mode.PR, try_=True)
    assert c.mode == Mode.NL
    await svc.unlock(a)
    with pytest.raises(LockError):
        await svc.unlock(a)                             # not held any more
    with pytest.raises(LockError):
        await svc.lock(R, Mode.PR, range=(9, 3))
    await svc.unlock(b)
    await svc.unlock(c)
    assert svc.statistics()["resources"] == 0


@trio_test
async def test_conversion_deadlock_is_reported_not_hung() -> None:
    """(The pure-Python service let both conversions wait for ever.)"""
    svc = LocalLockService()
    a = await svc.lock(R, Mode.PR)
    b = await svc.lock(R, Mode.PR)
    async with trio.open_nursery() as n:
        n.start_soon(svc.convert, a, Mode.EX)
        await trio.testing.wait_all_tasks_blocked()
        try:
            await svc.convert(b, Mode.EX)
        except ConversionDeadlock:
            assert b.mode == Mode.PR
            await svc.unlock(b)
    assert a.mode == Mode.EX


@trio_test
async def test_cancelled_waiter_and_conversion_leave_no_trace() -> None:
    svc = LocalLockService()
    ex = await svc.lock(R, Mode.EX)
    pr = await svc.lock(("inode", 2), Mode.PR)
    other = await svc.lock(("inode", 2), Mode.PR)
    async with trio.open_nursery() as n:
        n.start_soon(svc.lock, R, Mode.EX)
        n.start_soon(svc.convert, pr, Mode.EX)
        await trio.testing.wait_all_tasks_blocked()
        n.cancel_scope.cancel()
    assert pr.mode == Mode.PR
    await svc.unlock(ex)
    await svc.unlock(other)
    await svc.convert(pr, Mode.EX)                      # nothing left in the way
    await svc.unlock(pr)
    assert svc.statistics()["resources"] == 0


@trio_test
async def test_idle_resources_swept_and_lvb_kept_meanwhile(monkeypatch) -> None:
    monkeypatch.setattr(local, "SWEEP_EVERY_UNLOCKS", 4)
    svc = LocalLockService()
    lk = await svc.lock(R, Mode.EX)
    lk.lvb = b"state"
    await svc.unlock(lk)
    lk = await svc.lock(R, Mode.PR)
    assert lk.lvb.rstrip(b"\0") == b"state"
    await svc.unlock(lk)
    for i in range(8):
        await svc.unlock(await svc.lock(("other", i), Mode.EX))
    assert svc._table.statistics().resources < 9        # swept, not kept forever
    lk = await svc.lock(R, Mode.PR)
    assert lk.lvb == bytes(32)                          # (as before: idle loses it)
    await svc.unlock(lk)
