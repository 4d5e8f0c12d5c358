"""Glocks over the LockService: cached after use, demoted (flush + drop + release) when
another holder asks for a conflicting mode — the seam the DLM plugs into.

The first two run over the one-node lock service; the rest over the real DLM (three
lockspaces on the in-memory transport), which yields where the local one grants at
once: that is where the races are."""

import time

import trio
import trio.testing
from dlmcluster import memory_cluster
from trioutil import trio_test

from clusterfs.cache.glock import GlockManager
from clusterfs.dlm.interface import Mode
from clusterfs.dlm.local import LocalLockService


async def _cached_then_demoted():
    locks = LocalLockService()
    glocks = GlockManager(locks)
    demoted: list = []

    async def demote(glock, target):
        await trio.sleep(0)
        demoted.append(glock.name)

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
    glocks.on_demote("rgrp", lambda glock, target: order.append("demote"))
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


# -- over the real DLM -----------------------------------------------------------------
R = ("inode", 7)


async def _owned(ls) -> int:
    await trio.testing.wait_all_tasks_blocked(0.01)
    return ls.statistics().owned_locks


@trio_test
async def test_concurrent_first_uses_take_one_dlm_lock() -> None:
    async with memory_cluster([1, 2, 3]) as mc:
        glocks = GlockManager(mc.ls(2))
        async with trio.open_nursery() as nursery:
            glocks.start(nursery)
            held = []

            async def use() -> None:
                taken = await glocks.acquire([(R, Mode.EX)])
                held.append(taken)

            with trio.fail_after(5):
                for _ in range(3):
                    nursery.start_soon(use)
                while len(held) < 3:
                    await trio.sleep(0.001)
            assert await _owned(mc.ls(2)) == 1          # one lock, not three
            assert glocks.statistics()["acquired"] == 1
            for taken in held:
                glocks.release(taken)
            await glocks.release_all()
            assert await _owned(mc.ls(2)) == 0         # nothing leaked
            nursery.cancel_scope.cancel()


@trio_test
async def test_a_reader_elsewhere_demotes_ex_to_pr_not_to_nothing() -> None:
    async with memory_cluster([1, 2, 3]) as mc:
        glocks = GlockManager(mc.ls(1), min_hold=0)
        seen: list[Mode] = []
        glocks.on_demote("inode", lambda glock, target: seen.append(target))
        async with trio.open_nursery() as nursery:
            glocks.start(nursery)
            async with glocks.hold([(R, Mode.EX)]):
                pass
            with trio.fail_after(5):
                reader = await mc.ls(2).lock(R, Mode.PR)
            assert seen == [Mode.PR]
            assert glocks.glocks[R].mode == Mode.PR       # kept, in the mode that shares
            async with glocks.hold([(R, Mode.PR)]):        # and still usable: no request
                pass
            assert glocks.statistics()["acquired"] == 1
            with trio.fail_after(5):
                writer = mc.ls(3).lock(R, Mode.EX)
                await mc.ls(2).unlock(reader)
                await writer
            assert seen == [Mode.PR, Mode.NL]
            assert glocks.glocks[R].mode is None
            nursery.cancel_scope.cancel()


@trio_test
async def test_a_demote_waits_out_the_minimum_hold_time() -> None:
    async with memory_cluster([1, 2, 3]) as mc:
        hold = 0.3
        glocks = GlockManager(mc.ls(1), min_hold=hold)
        async with trio.open_nursery() as nursery:
            glocks.start(nursery)
            start = time.monotonic()
            async with glocks.hold([(R, Mode.EX)]):
                pass
            with trio.fail_after(5):
                other = await mc.ls(2).lock(R, Mode.EX)
            assert time.monotonic() - start >= hold
            await mc.ls(2).unlock(other)
            nursery.cancel_scope.cancel()


@trio_test
async def test_conversion_deadlock_is_retried_inside() -> None:
    """Two nodes hold PR and both want EX: the DLM fails one conversion with
    ConversionDeadlock; the glock must drop and ask again, never raise it."""
    async with memory_cluster([1, 2, 3]) as mc:
        managers = [GlockManager(mc.ls(n), min_hold=0) for n in (1, 2)]
        done: list[int] = []
        async with trio.open_nursery() as nursery:
            for g in managers:
                g.start(nursery)
            for g in managers:
                async with g.hold([(R, Mode.PR)]):
                    pass
            entered = trio.Event()

            async def upgrade(n: int, g: GlockManager) -> None:
                async with g.hold([(R, Mode.EX)]):
                    entered.set()
                    await trio.sleep(0.01)
                    done.append(n)

            with trio.fail_after(10):
                async with trio.open_nursery() as both:
                    for n, g in enumerate(managers):
                        both.start_soon(upgrade, n, g)
            assert sorted(done) == [0, 1]
            assert sum(g.statistics()["deadlocks_retried"] for g in managers) >= 1
            nursery.cancel_scope.cancel()


@trio_test
async def test_a_conversion_deadlock_never_lets_go_of_a_lock_a_local_task_holds() -> None:
    """As above, with another task on each node holding the glock in PR meanwhile (a
    listing, a lookup): the node whose conversion failed must not unlock under it. It
    did: the holder went on reading blocks another node was free to rewrite (a torn
    directory leaf is a withdraw). It waits for its holders, then lets go."""
    async with memory_cluster([1, 2, 3]) as mc:
        managers = [GlockManager(mc.ls(n), min_hold=0) for n in (1, 2)]
        async with trio.open_nursery() as nursery:
            for g in managers:
                g.start(nursery)
            readers = [await g.acquire([(R, Mode.PR)]) for g in managers]
            done: list[int] = []

            async def upgrade(n: int, g: GlockManager) -> None:
                async with g.hold([(R, Mode.EX)]):
                    done.append(n)

            async with trio.open_nursery() as both:
                for n, g in enumerate(managers):
                    both.start_soon(upgrade, n, g)
                with trio.fail_after(10):
                    while not any(g.statistics()["deadlocks_retried"] for g in managers):
                        await trio.sleep(0.01)
                await trio.sleep(0.2)                 # (time to unlock, if it would)
                for held in readers:
                    assert held[0].lock is not None and held[0].mode is not None, \
                        "a lock let go under a local holder"
                for g, held in zip(managers, readers, strict=True):
                    g.release(held)
            assert sorted(done) == [0, 1]
            nursery.cancel_scope.cancel()


@trio_test
async def test_a_blocking_callback_before_start_is_kept() -> None:
    async with memory_cluster([1, 2, 3]) as mc:
        glocks = GlockManager(mc.ls(1), min_hold=0)
        async with glocks.hold([(R, Mode.EX)]):
            pass
        async with trio.open_nursery() as nursery:
            waiter = nursery.start_soon(mc.ls(2).lock, R, Mode.EX)
            del waiter
            await trio.testing.wait_all_tasks_blocked(0.05)
            assert glocks.glocks[R].demote_to == Mode.NL   # asked, remembered
            glocks.start(nursery)                           # and done once started
            with trio.fail_after(5):
                while glocks.glocks[R].mode is not None:
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()


@trio_test
async def test_a_stronger_request_during_a_demote_is_not_lost() -> None:
    """A reader elsewhere makes us go EX->PR; while that demote flushes, a writer
    elsewhere asks for EX. The DLM says so once: the glock must go on down to nothing."""
    async with memory_cluster([1, 2, 3]) as mc:
        glocks = GlockManager(mc.ls(1), min_hold=0)
        flushing = trio.Event()
        go_on = trio.Event()

        async def slow_flush(glock, target):
            if target == Mode.PR:
                flushing.set()
                await go_on.wait()

        glocks.on_demote("inode", slow_flush)
        async with trio.open_nursery() as nursery:
            glocks.start(nursery)
            async with glocks.hold([(R, Mode.EX)]):
                pass
            got: list = []

            async def take(n, mode):
                got.append(await mc.ls(n).lock(R, mode))

            nursery.start_soon(take, 2, Mode.PR)
            with trio.fail_after(5):
                await flushing.wait()
                nursery.start_soon(take, 3, Mode.EX)     # during the EX->PR flush
                await trio.testing.wait_all_tasks_blocked(0.05)
                go_on.set()
                while len(got) < 1:
                    await trio.sleep(0.01)
                await mc.ls(2).unlock(got[0])            # the reader is done
                while len(got) < 2:                       # the writer gets it
                    await trio.sleep(0.01)
            assert glocks.glocks[R].mode is None
            nursery.cancel_scope.cancel()


async def _node_2_takes_r(mc, glocks: GlockManager, keep_using=None) -> None:
    """Node 1 (`glocks`) takes R in EX once; then node 2 asks for R in EX while the
    coroutine function `keep_using`, if any, goes on taking R on node 1 (two nodes
    both working on R). Returns once node 2 has had R and given it back."""
    async with trio.open_nursery() as nursery:
        glocks.start(nursery)
        async with glocks.hold([(R, Mode.EX)]):
            pass
        if keep_using is not None:
            nursery.start_soon(keep_using)
        with trio.fail_after(10):
            other = await mc.ls(2).lock(R, Mode.EX)
        nursery.cancel_scope.cancel()
    await mc.ls(2).unlock(other)


async def _contend(local_keeps_using: bool) -> float:
    """Node 1's hold time for R after node 2 took it (_node_2_takes_r)."""
    async with memory_cluster([1, 2, 3]) as mc:
        glocks = GlockManager(mc.ls(1), min_hold=0.05, max_hold=0.2, hold_step=0.05)

        async def keep_using() -> None:
            while True:
                async with glocks.hold([(R, Mode.EX)]):
                    await trio.sleep(0.002)

        await _node_2_takes_r(mc, glocks, keep_using if local_keeps_using else None)
        return glocks.glocks[R].hold_time


@trio_test
async def test_the_hold_time_grows_while_both_nodes_use_a_lock() -> None:
    assert await _contend(local_keeps_using=True) == 0.1


@trio_test
async def test_the_hold_time_stays_short_for_a_lock_no_longer_used_here() -> None:
    """Strict turns (use, then another node asks) must not lengthen every handover."""
    assert await _contend(local_keeps_using=False) == 0.05


@trio_test
async def test_no_local_user_gets_in_while_a_grown_glock_goes_down() -> None:
    """The hold time grows at the end of a contended hold; a local user must not be let
    in while the demote callback flushes (its changes would miss the flush and go to
    the other node unwritten). The hold time grew during the demote once, and
    usable_for() reopened."""
    async with memory_cluster([1, 2, 3]) as mc:
        glocks = GlockManager(mc.ls(1), min_hold=0.05, max_hold=0.5, hold_step=0.2)
        events: list[str] = []

        async def slow_demote(glock, target) -> None:
            events.append("flush starts")
            await trio.sleep(0.3)
            events.append("flush ends")

        glocks.on_demote("inode", slow_demote)

        async def keep_using() -> None:
            while True:
                async with glocks.hold([(R, Mode.EX)]):
                    events.append("used")
                await trio.sleep(0.01)

        await _node_2_takes_r(mc, glocks, keep_using)
        start = events.index("flush starts")
        assert events[start + 1] == "flush ends", events[start:start + 5]
        assert glocks.glocks[R].hold_time > 0.05        # it did grow


# -- the bounded cache (GlockManager.shrink / run_shrinker) ------------------------------
def _inode(n: int) -> tuple:
    return ("inode", n)


@trio_test
async def test_the_cache_lets_the_least_recently_used_idle_glocks_go() -> None:
    """Past max_cached, the oldest idle glocks go down to nothing through their demote
    callback and are forgotten with their DLM locks; one in use and a kind that is not
    shrinkable stay."""
    async with memory_cluster([1, 2, 3]) as mc:
        glocks = GlockManager(mc.ls(1), min_hold=0, max_cached=20)
        glocks.shrinkable.add("inode")
        demoted: list = []

        async def demote(glock, target):
            await trio.sleep(0)
            demoted.append((glock.name, target))

        glocks.on_demote("inode", demote)
        async with trio.open_nursery() as nursery:
            glocks.start(nursery)
            nursery.start_soon(glocks.run_shrinker)
            rgrp = await glocks.acquire([(("rgrp", 0), Mode.EX)])
            glocks.release(rgrp)                          # oldest of all, not shrinkable
            busy = await glocks.acquire([(_inode(0), Mode.EX)])   # held throughout
            for n in range(1, 60):
                glocks.release(await glocks.acquire([(_inode(n), Mode.EX)]))
            with trio.fail_after(5):
                while len(glocks.glocks) > 20:
                    await trio.sleep(0.01)
            await trio.testing.wait_all_tasks_blocked(0.01)
            kept = set(glocks.glocks)
            assert ("rgrp", 0) in kept and _inode(0) in kept
            assert _inode(59) in kept and _inode(1) not in kept    # oldest first
            gone = [name for name, _t in demoted]
            assert all(target == Mode.NL for _n, target in demoted)
            assert set(gone) == {_inode(n) for n in range(60)} - kept
            assert glocks.statistics()["evicted"] == len(gone)
            assert await _owned(mc.ls(1)) == len(kept)    # their DLM locks went too
            glocks.release(busy)
            nursery.cancel_scope.cancel()


@trio_test
async def test_a_user_of_a_glock_being_let_go_gets_a_fresh_one_and_one_dlm_lock() -> None:
    """A local user arriving while the shrinker demotes its glock waits, then asks afresh
    under a new glock: never two DLM locks for one resource from this node."""
    async with memory_cluster([1, 2, 3]) as mc:
        glocks = GlockManager(mc.ls(1), min_hold=0, max_cached=10)
        glocks.shrinkable.add("inode")
        gate = trio.Event()

        async def slow_demote(glock, target):
            await gate.wait()                     # the demote takes its time

        glocks.on_demote("inode", slow_demote)
        async with trio.open_nursery() as nursery:
            glocks.start(nursery)
            for n in range(12):
                glocks.release(await glocks.acquire([(_inode(n), Mode.EX)]))
            old = glocks.glocks[_inode(0)]
            nursery.start_soon(glocks.shrink, 5)
            await trio.testing.wait_all_tasks_blocked(0.01)
            assert old.demote_to == Mode.NL          # being let go, blocked in its demote
            got: list = []

            async def user():
                got.append(await glocks.acquire([(_inode(0), Mode.PR)]))

            nursery.start_soon(user)
            await trio.testing.wait_all_tasks_blocked(0.01)
            assert not got                           # waits for the demote
            gate.set()
            with trio.fail_after(5):
                while not got:
                    await trio.sleep(0.01)
            fresh = got[0][0]
            assert fresh is not old and glocks.glocks[_inode(0)] is fresh
            assert fresh.mode == Mode.PR and old.lock is None
            assert len(mc.ls(1).dump_local(b"inode:0") or []) == 1   # one lock, the new one
            glocks.release(got[0])
            nursery.cancel_scope.cancel()


@trio_test
async def test_the_hold_ends_when_a_local_user_needs_more_than_is_held() -> None:
    """Node 1 holds R in PR (a lookup) and node 2 asks for EX; then node 1's own user
    wants EX (the create after the lookup). Node 1's PR, of no use to anyone, must go
    at once, not at the end of its hold time; node 1 gets EX after node 2."""
    async with memory_cluster([1, 2, 3]) as mc:
        hold = 5.0
        glocks = GlockManager(mc.ls(1), min_hold=hold)
        order: list[int] = []
        async with trio.open_nursery() as nursery:
            glocks.start(nursery)
            async with glocks.hold([(R, Mode.PR)]):
                pass
            start = time.monotonic()

            async def node_2() -> None:
                lock = await mc.ls(2).lock(R, Mode.EX)
                order.append(2)
                await mc.ls(2).unlock(lock)

            async def node_1_creates() -> None:
                async with glocks.hold([(R, Mode.EX)]):
                    order.append(1)

            with trio.fail_after(hold / 2):
                async with trio.open_nursery() as both:
                    both.start_soon(node_2)
                    while glocks.glocks[R].demote_to is None:   # node 2 has asked
                        await trio.sleep(0.001)
                    both.start_soon(node_1_creates)
            assert order == [2, 1]
            assert time.monotonic() - start < hold / 2
            nursery.cancel_scope.cancel()


@trio_test
async def test_idle_sharing_goes_in_batches_and_stops_when_the_node_is_busy() -> None:
    """Thousands of idle EX glocks go down to PR a batch at a time, the event loop
    running other tasks between batches (one step over all of them stopped the loop
    for about 0.35 s under load); once quiet() says there is something to write, the
    round stops."""
    from clusterfs.cache.glock import SHARE_BATCH

    async with memory_cluster([1, 2, 3]) as mc:
        glocks = GlockManager(mc.ls(1), min_hold=0)
        glocks.share_when_idle.add("inode")
        glocks.on_demote("inode", lambda glock, target: None)
        count = 3 * SHARE_BATCH + 10
        async with trio.open_nursery() as nursery:
            glocks.start(nursery)
            for n in range(count):
                glocks.release(await glocks.acquire([(_inode(n), Mode.EX)]))
            steps_between: list[int] = []
            seen = 0

            async def watcher() -> None:
                nonlocal seen
                while True:
                    steps_between.append(glocks.statistics()["shared_when_idle"] - seen)
                    seen = glocks.statistics()["shared_when_idle"]
                    await trio.sleep(0)

            nursery.start_soon(watcher)
            busy_after = [2 * SHARE_BATCH]
            quiet = lambda: glocks.statistics()["shared_when_idle"] < busy_after[0]  # noqa: E731
            await glocks._share_idle(time.monotonic() + 10, quiet)
            assert glocks.statistics()["shared_when_idle"] == 2 * SHARE_BATCH
            # (trio orders each batch of runnable tasks at random, so the watcher may
            # see two of the round's steps between two of its own, never more)
            assert max(steps_between) <= 2 * SHARE_BATCH
            busy_after[0] = count
            await glocks._share_idle(time.monotonic() + 10, quiet)
            assert glocks.statistics()["shared_when_idle"] == count
            with trio.fail_after(10):
                while any(g.mode != Mode.PR for g in glocks.glocks.values()):
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
