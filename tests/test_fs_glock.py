"""Glocks over the LockService: cached after use, demoted (flush + drop + release) when
another holder asks for a conflicting mode — the seam the DLM plugs into."""

import trio
import trio.testing

from clusterfs.cache.glock import GlockManager
from clusterfs.dlm.interface import Mode
from clusterfs.dlm.local import LocalLockService


async def _cached_then_demoted():
    locks = LocalLockService()
    glocks = GlockManager(locks)
    demoted: list = []

    async def demote(name):
        await trio.sleep(0)
        demoted.append(name)

    glocks.on_demote("inode", demote)
    async with trio.open_nursery() as nursery:
        glocks.start(nursery)
        async with glocks.hold([(("inode", 7), Mode.EX)]):
            pass
        async with glocks.hold([(("inode", 7), Mode.PR)]):    # cached: no new request
            pass
        assert glocks.statistics()["acquired"] == 1
        assert glocks.statistics()["cached_hits"] == 1
        # "another node" wants it: our glock flushes and releases, then it is granted
        with trio.fail_after(5):
            other = await locks.lock(("inode", 7), Mode.EX)
        assert demoted == [("inode", 7)]
        assert glocks.statistics()["cached"] == 0
        await locks.unlock(other)
        async with glocks.hold([(("inode", 7), Mode.EX)]):     # taken again afresh
            pass
        assert glocks.statistics()["acquired"] == 2
        nursery.cancel_scope.cancel()


async def _demote_waits():
    locks = LocalLockService()
    glocks = GlockManager(locks)
    order: list[str] = []
    glocks.on_demote("rgrp", lambda name: order.append("demote"))
    async with trio.open_nursery() as nursery:
        glocks.start(nursery)

        async def other_node():
            await locks.lock(("rgrp", 1), Mode.EX)
            order.append("granted")

        async with glocks.hold([(("rgrp", 1), Mode.EX)]):
            nursery.start_soon(other_node)
            # until other_node's request has reached the lock service and blocks there
            await trio.testing.wait_all_tasks_blocked()
            order.append("body done")
        with trio.fail_after(5):
            while "granted" not in order:
                await trio.sleep(0.01)
        assert order == ["body done", "demote", "granted"]
        nursery.cancel_scope.cancel()


def test_lock_stays_cached_then_is_demoted_on_conflict():
    trio.run(_cached_then_demoted)


def test_demote_waits_for_local_holders():
    trio.run(_demote_waits)
