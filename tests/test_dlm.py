"""Tier 2: the distributed lock manager, many nodes in one trio run.

MemoryNetwork + StaticCluster (tests/dlmcluster.py): real message passing,
crashes and views driven by hand.
"""

from __future__ import annotations

import zlib

import pytest
import trio
import trio.testing
from dlmcluster import MemCluster, memory_cluster
from trioutil import trio_test

from clusterfs.dlm.interface import ConversionDeadlock, Mode, resource_key
from clusterfs.dlm.lockspace import Lockspace
from clusterfs.dlm.locktable import Queue
from clusterfs.dlm.toss import TOSS_BATCH
from clusterfs.errors import LockCancelled, LockError, WouldBlock
from clusterfs.membership.view import Fenced, ViewChange
from clusterfs.wire.types import MsgType

R = ("inode", 7)


def master_of(mc: MemCluster, name: tuple) -> int:
    key = resource_key(name)
    for nid in mc.nodes:
        if key in mc.ls(nid).ls_mastered:
            return nid
    raise AssertionError("no master")


async def settle() -> None:
    for _ in range(5):
        await trio.testing.wait_all_tasks_blocked(0.01)


@trio_test
async def test_lock_unlock_local_and_remote() -> None:
    async with memory_cluster([1, 2, 3]) as mc:
        a, b = mc.ls(1), mc.ls(2)
        la = await a.lock(R, Mode.EX)
        assert la.granted and la.mode == Mode.EX
        assert master_of(mc, R) == 1                      # first requester masters
        got: list = []

        async def take() -> None:
            got.append(await b.lock(R, Mode.PR))

        async with trio.open_nursery() as n:
            n.start_soon(take)
            await settle()
            assert not got                                # waits for the EX holder
            await a.unlock(la)
        assert got[0].granted and got[0].mode == Mode.PR
        assert b.statistics().remote_requests == 1


@trio_test
async def test_a_message_reaches_the_endpoint_when_it_is_decided() -> None:
    """No queue of the DLM's own: what a lockspace decides to send is in the
    endpoint's hands before the deciding task yields, so per-peer FIFO of the
    transport is the order of the decisions."""
    async with memory_cluster([1, 2]) as mc:
        a = mc.ls(1)
        ep = a.ls_dlm.endpoint
        before = ep.sent
        a._send(2, MsgType.DLM_QUERY_REPLY, {"q": 0, "locks": []})
        a._send(2, MsgType.DLM_QUERY_REPLY, {"q": 1, "locks": []})
        assert ep.sent == before + 2
        a._send(9, MsgType.DLM_QUERY_REPLY, {"q": 2, "locks": []})   # not a node
        assert a.ls_dlm.dropped_sends == 1


@trio_test
async def test_directory_is_hash_over_members() -> None:
    async with memory_cluster([1, 2, 3]) as mc:
        for i in range(20):
            name = ("rgrp", i)
            node = 1 + i % 3
            lk = await mc.ls(node).lock(name, Mode.PR)
            key = resource_key(name)
            dir_node = sorted([1, 2, 3])[zlib.crc32(key) % 3]
            assert mc.ls(dir_node).ls_dir[key] == node   # directory names the master
            assert master_of(mc, name) == node
            await mc.ls(node).unlock(lk)


def _hint_by_number(key: bytes) -> int | None:
    """rgrp:N is at home on node N (of 1..3); anything else by hash."""
    kind, _, number = key.partition(b":")
    return int(number) if kind == b"rgrp" and number.isdigit() else None


@trio_test
async def test_a_directory_hint_makes_the_hinted_member_directory_and_master() -> None:
    async with memory_cluster([1, 2, 3], dir_hint=_hint_by_number) as mc:
        for n in (1, 2, 3):
            before = mc.ls(n).statistics()
            lk = await mc.ls(n).lock(("rgrp", n), Mode.EX)
            assert mc.ls(n).ls_dir[resource_key(("rgrp", n))] == n
            assert master_of(mc, ("rgrp", n)) == n
            after = mc.ls(n).statistics()                     # no round trip
            assert (after.remote_requests, after.remote_lookups) == \
                (before.remote_requests, before.remote_lookups)
            await mc.ls(n).unlock(lk)
        lk = await mc.ls(1).lock(("rgrp", 7), Mode.PR)      # 7 is no member: by hash
        key = resource_key(("rgrp", 7))
        assert mc.ls([1, 2, 3][zlib.crc32(key) % 3]).ls_dir[key] == 1
        await mc.ls(1).unlock(lk)


@trio_test
async def test_a_lookup_carries_the_request_to_a_directory_node_that_masters_it() -> None:
    """Node 2 locks a resource at home on node 1, which masters it: one message out
    (the lookup, carrying the request), no separate request (the Linux DLM's
    lookup-as-request); a resource mastered elsewhere still gets its request."""
    async with memory_cluster([1, 2, 3], dir_hint=_hint_by_number) as mc:
        home = await mc.ls(1).lock(("rgrp", 1), Mode.PR)        # node 1 masters it
        sent: list[int] = []
        real_send = mc.ls(2)._send

        def logged(dest, mtype, body):
            sent.append(mtype)
            real_send(dest, mtype, body)

        mc.ls(2)._send = logged
        got = await mc.ls(2).lock(("rgrp", 1), Mode.PR)
        assert got.granted and sent == [MsgType.DLM_LOOKUP]
        third = await mc.ls(3).lock(("rgrp", 2), Mode.PR)     # at home on 2, master 3
        sent.clear()
        other = await mc.ls(2).lock(("rgrp", 2), Mode.PR)     # 2 is directory: local
        assert other.granted and sent == [MsgType.DLM_REQUEST]
        for ls, lk in ((1, home), (2, got), (3, third), (2, other)):
            await mc.ls(ls).unlock(lk)


def _at_home_on_1(key: bytes) -> int:
    return 1


@trio_test
async def test_locks_asked_for_together_go_as_one_batch_each_way() -> None:
    """A listing warms many locks at once (GlockManager.warm): inside batched() the
    lookups carrying the requests go to the master as one DLM_BATCH, and the master
    answers the batch (lookup replies and grants) with one batch too."""
    names = [("inode", 1000 + i) for i in range(40)]
    async with memory_cluster([1, 2, 3], dir_hint=_at_home_on_1) as mc:
        one, two = mc.ls(1), mc.ls(2)
        held = [await one.lock(name, Mode.PR) for name in names]   # node 1 masters
        sent = (one.ls_dlm.endpoint.sent, two.ls_dlm.endpoint.sent)
        got: list = []

        async def take(name) -> None:
            got.append(await two.lock(name, Mode.PR))

        with two.batched():
            async with trio.open_nursery() as nursery:
                for name in names:
                    nursery.start_soon(take, name)
        assert len(got) == len(names) and all(lk.granted for lk in got)
        assert one.ls_dlm.endpoint.sent - sent[0] == 1     # (unbatched: 80 messages)
        assert two.ls_dlm.endpoint.sent - sent[1] == 1     # (unbatched: 40)
        assert one.statistics().batches_sent == two.statistics().batches_sent == 1
        for lk in got:
            await two.unlock(lk)
        for lk in held:
            await one.unlock(lk)


@trio_test
async def test_a_batch_keeps_the_order_of_what_it_carries() -> None:
    """Everything a node sends to another while batching goes through one outbox in
    the order it was decided, and the receiver handles a batch's messages in that
    order (per-pair order, which recovery relies on, holds)."""
    async with memory_cluster([1, 2]) as mc:
        one, two = mc.ls(1), mc.ls(2)
        seen: list[int] = []
        real = one._dispatch

        def record(sender, mtype, body):
            if mtype == MsgType.DLM_QUERY_REPLY:
                seen.append(body["q"])
            real(sender, mtype, body)

        one._dispatch = record
        with two.batched():
            for q in range(5):
                two._send(1, MsgType.DLM_QUERY_REPLY, {"q": q, "locks": []})
            await trio.sleep(0)
            two._send(1, MsgType.DLM_QUERY_REPLY, {"q": 5, "locks": []})
        two._send(1, MsgType.DLM_QUERY_REPLY, {"q": 6, "locks": []})   # (not batched)
        await settle()
        assert seen == list(range(7))
        assert two.statistics().batches_sent >= 1


@trio_test
async def test_a_hinted_directory_node_dies_and_its_names_go_by_hash() -> None:
    """Node 3's names move to hash placement while it is gone and come back when it
    rejoins; locks held by survivors stay granted through both recoveries."""
    async with memory_cluster([1, 2, 3], dir_hint=_hint_by_number) as mc:
        name = ("rgrp", 3)
        kept = await mc.ls(1).lock(name, Mode.PR)
        assert mc.ls(3).ls_dir[resource_key(name)] == 1
        mc.crash(3)
        await mc.wait_running()
        key = resource_key(name)
        by_hash = [1, 2][zlib.crc32(key) % 2]
        assert mc.ls(by_hash).ls_dir[key] == 1                # rebuilt where hash says
        got = await mc.ls(2).lock(name, Mode.PR)              # compatible: granted
        await mc.join(3)
        await mc.wait_running()
        assert mc.ls(3).ls_dir[key] == 1                      # home again
        assert kept.granted and got.granted
        waiter: list = []

        async def want_ex() -> None:
            waiter.append(await mc.ls(3).lock(name, Mode.EX))

        async with trio.open_nursery() as n:
            n.start_soon(want_ex)
            await settle()
            assert not waiter
            await mc.ls(1).unlock(kept)
            await mc.ls(2).unlock(got)
        assert waiter[0].granted


@trio_test
async def test_blocking_callback_and_lvb() -> None:
    async with memory_cluster([1, 2, 3]) as mc:
        a, b = mc.ls(1), mc.ls(3)
        blocked: list[Mode] = []
        la = await a.lock(R, Mode.EX, on_blocking=blocked.append)
        la.lvb = b"free=42"
        async with trio.open_nursery() as n:
            res: list = []

            async def take() -> None:
                res.append(await b.lock(R, Mode.PR))

            n.start_soon(take)
            await settle()
            assert blocked == [Mode.PR]
            await a.convert(la, Mode.PR)                  # down-convert stores the LVB
        lb = res[0]
        assert lb.lvb.rstrip(b"\0") == b"free=42" and lb.lvb_valid
        await a.unlock(la)
        await b.unlock(lb)
        lc = await mc.ls(2).lock(R, Mode.PW)
        assert lc.lvb.rstrip(b"\0") == b"free=42"
        lc.lvb = b"free=41"
        await mc.ls(2).unlock(lc)
        ld = await a.lock(R, Mode.PR)       # conflicts with PW: after its release
        assert ld.lvb.rstrip(b"\0") == b"free=41"


@trio_test
async def test_try_and_ranges_remote() -> None:
    async with memory_cluster([1, 2]) as mc:
        a, b = mc.ls(1), mc.ls(2)
        name = ("data", 5)
        la = await a.lock(name, Mode.EX, range=(0, 4095))
        lb = await b.lock(name, Mode.EX, range=(4096, 8191))   # disjoint: granted
        assert lb.granted
        with pytest.raises(WouldBlock):
            await b.lock(name, Mode.PR, range=(4000, 4100), try_=True)
        with pytest.raises(WouldBlock):
            await b.lock(name, Mode.PW, range=(0, 0), try_=True)
        await a.unlock(la)
        lc = await b.lock(name, Mode.PR, range=(4000, 4095), try_=True)
        assert lc.granted
        assert b.statistics().owned_waiting == 0


@trio_test
async def test_no_starvation_of_ex_by_new_pr() -> None:
    async with memory_cluster([1, 2, 3]) as mc:
        a, b, c = mc.ls(1), mc.ls(2), mc.ls(3)
        first = await a.lock(R, Mode.PR)
        order: list[str] = []

        async def writer() -> None:
            lk = await b.lock(R, Mode.EX)
            order.append("EX")
            await b.unlock(lk)

        async def reader() -> None:
            lk = await c.lock(R, Mode.PR)
            order.append("PR")
            await c.unlock(lk)

        async with trio.open_nursery() as n:
            n.start_soon(writer)
            await settle()
            n.start_soon(reader)          # compatible with the holder, but queued behind EX
            await settle()
            assert order == []
            await a.unlock(first)
        assert order == ["EX", "PR"]


@trio_test
async def test_convert_up_waits_and_conversion_deadlock() -> None:
    async with memory_cluster([1, 2, 3]) as mc:
        a, b = mc.ls(2), mc.ls(3)
        la = await a.lock(R, Mode.PR)
        lb = await b.lock(R, Mode.PR)
        async with trio.open_nursery() as n:
            n.start_soon(a.convert, la, Mode.EX)
            await settle()
            assert la.mode == Mode.PR
            with pytest.raises(ConversionDeadlock):
                await b.convert(lb, Mode.EX)
            assert lb.mode == Mode.PR and lb.granted        # keeps its granted mode
            await b.unlock(lb)
        assert la.mode == Mode.EX


@trio_test
async def test_explicit_cancel_and_trio_cancellation() -> None:
    async with memory_cluster([1, 2]) as mc:
        a, b = mc.ls(1), mc.ls(2)
        la = await a.lock(R, Mode.EX)
        handles: list = []
        errors: list = []

        async def waiter() -> None:
            try:
                await b.lock(R, Mode.EX)
            except LockCancelled as exc:
                errors.append(exc)

        async with trio.open_nursery() as n:
            n.start_soon(waiter)
            await settle()
            lkb = next(iter(b.ls_lkbs.values()))
            handles.append(lkb.lkb_lock)
            assert await b.cancel(handles[0])
        assert len(errors) == 1

        # trio cancellation of a waiting request removes it from the master's queue
        with trio.move_on_after(0.05):
            await b.lock(R, Mode.EX)
        await settle()
        assert [i.queue for i in mc.ls(1).dump_local(resource_key(R))] == [Queue.GRANTED]
        await a.unlock(la)
        lb = await b.lock(R, Mode.EX, try_=True)
        assert lb.granted


@trio_test
async def test_unlock_not_held_raises() -> None:
    async with memory_cluster([1, 2]) as mc:
        lk = await mc.ls(2).lock(R, Mode.NL)
        await mc.ls(2).unlock(lk)
        with pytest.raises(LockError):
            await mc.ls(2).unlock(lk)


@trio_test
async def test_dump_resource_from_any_node() -> None:
    async with memory_cluster([1, 2, 3]) as mc:
        lk = await mc.ls(2).lock(R, Mode.PW, range=(10, 20))
        d = await mc.ls(3).dump_resource(R)
        assert d["master"] == 2
        assert d["locks"][0]["grmode"] == "PW" and d["locks"][0]["range"] == [10, 20]
        await mc.ls(2).unlock(lk)
        d = await mc.ls(1).dump_resource(("nobody", 1))
        assert d["master"] is None


# -- recovery ---------------------------------------------------------------------


@trio_test
async def test_master_dies_waiters_complete_and_survivor_keeps_lock() -> None:
    async with memory_cluster([1, 2, 3, 4]) as mc:
        dead = 1
        held = await mc.ls(dead).lock(R, Mode.PW)       # node 1 masters R and holds PW
        held.lvb = b"written by the dead"
        keep = await mc.ls(2).lock(R, Mode.CR)          # compatible with PW: granted
        got: list = []

        async def wait_ex() -> None:
            got.append(await mc.ls(3).lock(R, Mode.EX))

        async with trio.open_nursery() as n:
            n.start_soon(wait_ex)
            await settle()
            assert not got
            mc.crash(dead)                             # master and PW holder die
            await mc.wait_running()
            await settle()
            assert not got                             # node 2 still holds CR (EX waits)
            new_master = master_of(mc, R)
            assert new_master in (2, 3)
            infos = mc.ls(new_master).dump_local(resource_key(R))
            assert {(i.nodeid, i.queue) for i in infos} == {(2, Queue.GRANTED),
                                                            (3, Queue.WAITING)}
            assert keep.granted                         # the survivor did not lose it
            await mc.ls(2).unlock(keep)
        assert got[0].granted
        assert got[0].lvb_valid is False                # a dead writer: LVB not valid


@trio_test
async def test_holder_dies_master_survives_lvb_invalid() -> None:
    async with memory_cluster([1, 2, 3]) as mc:
        first = await mc.ls(2).lock(R, Mode.NL)         # node 2 becomes master
        ex = await mc.ls(3).lock(R, Mode.EX)
        ex.lvb = b"x"
        got: list = []

        async def wait_pr() -> None:
            got.append(await mc.ls(1).lock(R, Mode.PR))

        async with trio.open_nursery() as n:
            n.start_soon(wait_pr)
            await settle()
            mc.crash(3)
        assert got[0].granted and got[0].lvb_valid is False
        assert first.granted
        # a later PW/EX release makes it valid again
        await mc.ls(1).unlock(got[0])
        w = await mc.ls(1).lock(R, Mode.EX)
        w.lvb = b"fresh"
        await mc.ls(1).unlock(w)
        r = await mc.ls(2).lock(R, Mode.PR)
        assert r.lvb_valid and r.lvb.rstrip(b"\0") == b"fresh"


@trio_test
async def test_lvb_survives_master_death_when_reader_holds_it() -> None:
    async with memory_cluster([1, 2, 3]) as mc:
        w = await mc.ls(1).lock(R, Mode.EX)
        w.lvb = b"v1"
        await mc.ls(1).unlock(w)
        r = await mc.ls(2).lock(R, Mode.PR)
        assert r.lvb.rstrip(b"\0") == b"v1"
        mc.crash(1)
        await mc.wait_running()
        r2 = await mc.ls(3).lock(R, Mode.PR)
        assert r2.lvb_valid and r2.lvb.rstrip(b"\0") == b"v1"


@trio_test
async def test_no_quorum_requests_wait_then_complete() -> None:
    async with memory_cluster([1, 2, 3]) as mc:
        mc.crash(2, remove=False)
        mc.crash(3, remove=False)
        mc.cluster.set_members({1})                     # 1 of 3: no quorum
        got: list = []
        errors: list = []

        async def try_lock() -> None:
            try:
                got.append(await mc.ls(1).lock(("x", 1), Mode.EX))
            except Exception as exc:  # pragma: no cover - must not happen
                errors.append(exc)

        async with trio.open_nursery() as n:
            n.start_soon(try_lock)
            await trio.sleep(0.3)
            assert not got and not errors               # neither granted nor failed
            assert not mc.ls(1).ls_running
            await mc.join(2)                            # quorum again
        assert got and got[0].granted


@trio_test
async def test_recovery_waits_for_fencing_and_aborts_on_newer_view(caplog) -> None:
    caplog.set_level("INFO", logger="clusterfs.dlm")
    async with memory_cluster([1, 2, 3, 4, 5], auto_fence=False) as mc:
        held = await mc.ls(1).lock(R, Mode.EX)
        got: list = []

        async def wait_ex() -> None:
            got.append(await mc.ls(2).lock(R, Mode.EX))

        async with trio.open_nursery() as n:
            n.start_soon(wait_ex)
            await settle()
            mc.crash(1)                                  # gen 2, node 1 not fenced yet
            await trio.sleep(0.2)
            assert not got and not mc.ls(2).ls_running   # waits for fencing
            mc.crash(5)                                  # gen 3 overtakes gen 2
            await trio.sleep(0.1)
            mc.cluster.fence_done({1, 5})
        assert got[0].granted
        assert held.granted                               # (the dead node's own handle)
        text = caplog.text
        assert "wait for fencing of [1]" in text
        assert "recovery aborted by a newer view" in text
        assert "gen 3: recover: 8 done" in text


@trio_test
async def test_join_rehashes_directory() -> None:
    async with memory_cluster([1, 2, 3]) as mc:
        locks = {}
        for i in range(30):
            locks[i] = await mc.ls(1 + i % 3).lock(("f", i), Mode.PR)
        await mc.join(4)
        await mc.wait_running()
        for i in range(30):
            key = resource_key(("f", i))
            dir_node = sorted([1, 2, 3, 4])[zlib.crc32(key) % 4]
            assert mc.ls(dir_node).ls_dir.get(key) == 1 + i % 3
        # the new node locks against existing masters
        for i in range(30):
            with pytest.raises(WouldBlock):
                await mc.ls(4).lock(("f", i), Mode.EX, try_=True)
            lk = await mc.ls(4).lock(("f", i), Mode.PR)
            await mc.ls(4).unlock(lk)


@trio_test
async def test_dead_nodes_waiting_request_is_purged() -> None:
    async with memory_cluster([1, 2, 3]) as mc:
        held = await mc.ls(1).lock(R, Mode.EX)
        async with trio.open_nursery() as n:
            n.start_soon(mc.ls(3).lock, R, Mode.EX)
            await settle()
            mc.crash(3)
            await mc.wait_running()
            n.cancel_scope.cancel()
        await mc.ls(1).unlock(held)
        lk = await mc.ls(2).lock(R, Mode.EX, try_=True)      # nobody dead in the queue
        assert lk.granted


def _ls_conforms(ls: Lockspace) -> None:
    from clusterfs.dlm.interface import LockService

    _: LockService = ls


@trio_test
async def test_lockspace_is_a_lockservice() -> None:
    async with memory_cluster([1]) as mc:
        _ls_conforms(mc.ls(1))
        lk = await mc.ls(1).lock(("journal", 0), Mode.EX)
        await mc.ls(1).convert(lk, Mode.NL)
        await mc.ls(1).convert(lk, Mode.PR)
        await mc.ls(1).unlock(lk)
        assert mc.ls(1).statistics().owned_locks == 0


@trio_test
async def test_conversion_queued_across_master_death() -> None:
    async with memory_cluster([1, 2, 3, 4]) as mc:
        await mc.ls(1).lock(R, Mode.NL)                  # node 1 masters R
        l2 = await mc.ls(2).lock(R, Mode.PR)
        l3 = await mc.ls(3).lock(R, Mode.PR)
        async with trio.open_nursery() as n:
            n.start_soon(mc.ls(2).convert, l2, Mode.EX)
            await settle()
            assert l2.mode == Mode.PR
            mc.crash(1)
            await mc.wait_running()
            await settle()
            m = master_of(mc, R)
            infos = {i.nodeid: i for i in mc.ls(m).dump_local(resource_key(R))}
            assert infos[2].queue == Queue.CONVERTING and infos[2].rqmode == Mode.EX
            assert infos[3].queue == Queue.GRANTED
            await mc.ls(3).unlock(l3)
        assert l2.mode == Mode.EX and l2.granted


@trio_test
async def test_cancel_lost_with_dead_master_is_completed() -> None:
    async with memory_cluster([1, 2, 3]) as mc:
        await mc.ls(1).lock(R, Mode.EX)                  # node 1 masters and holds R
        async with trio.open_nursery() as n:
            n.start_soon(mc.ls(2).lock, R, Mode.EX)
            await settle()
            n.cancel_scope.cancel()                      # CANCEL queued to node 1 ...
            mc.crash(1)                                  # ... which dies before it
        await mc.wait_running()
        await settle()
        assert mc.ls(2).statistics().owned_locks == 0
        lk = await mc.ls(3).lock(R, Mode.EX, try_=True)  # no phantom waiter/holder
        assert lk.granted


@trio_test
async def test_expelled_node_fails_waiters() -> None:
    from clusterfs.errors import Expelled

    async with memory_cluster([1, 2, 3]) as mc:
        await mc.ls(1).lock(R, Mode.EX)
        errors: list = []

        async def waiter() -> None:
            try:
                await mc.ls(3).lock(R, Mode.EX)
            except Expelled as exc:
                errors.append(exc)

        async with trio.open_nursery() as n:
            n.start_soon(waiter)
            await settle()
            mc.cluster.set_members({1, 2})               # node 3 is expelled (alive)
        assert len(errors) == 1
        with pytest.raises(Expelled):
            await mc.ls(3).lock(("y", 1), Mode.NL)


@trio_test
async def test_cancel_waiting_conversion_keeps_granted_mode() -> None:
    async with memory_cluster([1, 2]) as mc:
        la = await mc.ls(1).lock(R, Mode.PR)
        lb = await mc.ls(2).lock(R, Mode.PR)
        with pytest.raises(WouldBlock):
            await mc.ls(2).convert(lb, Mode.EX, try_=True)
        assert lb.mode == Mode.PR
        with trio.move_on_after(0.05):
            await mc.ls(2).convert(lb, Mode.EX)       # cancelled while queued
        await settle()
        assert lb.mode == Mode.PR and lb.granted
        infos = mc.ls(1).dump_local(resource_key(R))
        assert [(i.queue, i.grmode) for i in infos] == [(Queue.GRANTED, Mode.PR)] * 2
        await mc.ls(1).unlock(la)
        await mc.ls(2).convert(lb, Mode.EX)
        assert lb.mode == Mode.EX


# -- a node without quorum merged back: what was lost between the two sides ------
# Node 1 goes on alone in a view without quorum (2 and 3 went silent to it: SIGSTOP, a
# cut) while 2 and 3 still hold the old view; then the membership merges it back into
# that view, naming it in `joined` (no view without quorum purged or fenced anything).
# Meanwhile messages between the sides were lost: node 1 drops whatever a node outside
# its view sends, sends nothing to a master outside it, and a broken connection drops
# what was queued. Each test loses one kind and then needs that lock (a hang guard of
# HANG seconds makes a lock that never comes a failure). All four hung before the merge
# resynchronised the pairs it joins.
HANG = 10


async def alone_without_quorum(mc: MemCluster, node: int) -> None:
    others = set(mc.nodes) - {node}
    mc.install_on([node], {node}, left=others)
    await settle()
    assert not mc.ls(node).ls_running


async def merged_back(mc: MemCluster, node: int) -> None:
    mc.install_on(list(mc.nodes), set(mc.nodes), joined={node})
    await mc.wait_running()


async def make_master(ls: Lockspace, name: tuple) -> None:
    """ls masters name from now on (the first node that asks is its master)."""
    await ls.unlock(await ls.lock(name, Mode.NL))


@trio_test
async def test_an_unlock_the_lone_master_dropped_does_not_hold_the_lock_forever() -> None:
    async with memory_cluster([1, 2, 3]) as mc:
        await make_master(mc.ls(1), R)
        held = await mc.ls(2).lock(R, Mode.EX)
        await alone_without_quorum(mc, 1)
        await mc.ls(2).unlock(held)                  # DLM_UNLOCK: node 1 drops it
        await settle()
        await merged_back(mc, 1)
        with trio.fail_after(HANG):
            got = await mc.ls(3).lock(R, Mode.EX)
        assert got.granted


@trio_test
async def test_a_grant_the_lone_owner_dropped_is_granted_after_the_merge() -> None:
    async with memory_cluster([1, 2, 3]) as mc:
        held = await mc.ls(2).lock(R, Mode.EX)       # node 2 masters R
        got: list = []

        async def want_pr() -> None:
            got.append(await mc.ls(1).lock(R, Mode.PR))

        async with trio.open_nursery() as n:
            n.start_soon(want_pr)
            await settle()
            await alone_without_quorum(mc, 1)
            await mc.ls(2).unlock(held)              # DLM_GRANT to node 1: dropped
            await settle()
            assert not got
            await merged_back(mc, 1)
            with trio.fail_after(HANG):
                while not got:
                    await trio.sleep(0.01)
        assert got[0].granted and got[0].mode == Mode.PR
        with trio.fail_after(HANG):                  # and the master agrees it is held
            other = await mc.ls(3).lock(R, Mode.PR)
        with pytest.raises(WouldBlock):
            await mc.ls(2).lock(R, Mode.EX, try_=True)
        await mc.ls(3).unlock(other)


@trio_test
async def test_an_unlock_the_lone_owner_never_sent_releases_the_lock_after_the_merge() -> None:
    async with memory_cluster([1, 2, 3]) as mc:
        await make_master(mc.ls(2), R)
        held = await mc.ls(1).lock(R, Mode.EX)
        await alone_without_quorum(mc, 1)
        await mc.ls(1).unlock(held)                  # its master is outside node 1's view
        await merged_back(mc, 1)
        with trio.fail_after(HANG):
            got = await mc.ls(3).lock(R, Mode.EX)
        assert got.granted


@trio_test
async def test_a_down_conversion_the_lone_owner_never_sent_counts_after_the_merge() -> None:
    async with memory_cluster([1, 2, 3]) as mc:
        await make_master(mc.ls(2), R)
        held = await mc.ls(1).lock(R, Mode.EX)
        await alone_without_quorum(mc, 1)
        await mc.ls(1).convert(held, Mode.PR)        # down: applied here, never sent
        await merged_back(mc, 1)
        with trio.fail_after(HANG):
            got = await mc.ls(3).lock(R, Mode.PR)    # compatible with node 1's PR
        assert got.granted
        with pytest.raises(WouldBlock):              # and node 1 still holds PR
            await mc.ls(3).lock(R, Mode.EX, try_=True)


@trio_test
async def test_a_conversion_deadlock_a_merge_rebuilt_is_refused_not_hung() -> None:
    """Nodes 1 and 3 hold PR and both convert to EX. Node 3's conversion waits at the
    master; node 1's, frozen on the way, reaches the master while node 1 is alone
    without quorum, so the master's refusal (EDEADLK) is lost, and the merge re-sends
    node 1's lock still converting: both conversions queued, each waiting for the
    other's PR, which no convert call saw. The rebuilt queue must refuse one (it hung:
    an in-process cluster's two nodes waited forever on one inode's lock)."""
    async with memory_cluster([1, 2, 3]) as mc:
        await make_master(mc.ls(2), R)
        one, three = await mc.ls(1).lock(R, Mode.PR), await mc.ls(3).lock(R, Mode.PR)
        outcome: dict[int, str] = {}

        async def to_ex(node: int, lock) -> None:
            try:
                await mc.ls(node).convert(lock, Mode.EX)
                outcome[node] = "granted"
            except ConversionDeadlock:
                outcome[node] = "deadlock"
                await mc.ls(node).unlock(lock)

        async with trio.open_nursery() as n:
            n.start_soon(to_ex, 3, three)
            await settle()
            mc.net.hold(1)
            n.start_soon(to_ex, 1, one)
            await settle()
            await alone_without_quorum(mc, 1)
            mc.net.release(1)                     # the master refuses; node 1 drops it
            await settle()
            assert outcome == {}
            with trio.fail_after(HANG):
                await merged_back(mc, 1)
                while len(outcome) < 2:
                    await trio.sleep(0.01)
        assert outcome == {1: "deadlock", 3: "granted"}
        assert three.mode == Mode.EX


@trio_test
async def test_a_merge_overtaken_by_a_newer_view_still_resynchronises() -> None:
    """The view that merges node 1 back is overtaken at once by a newer one (node 3
    dies), which names nobody as joined: the resync the first asked for must still
    happen, in the second one's recovery."""
    async with memory_cluster([1, 2, 3]) as mc:
        await make_master(mc.ls(1), R)
        held = await mc.ls(2).lock(R, Mode.EX)
        await alone_without_quorum(mc, 1)
        await mc.ls(2).unlock(held)                  # dropped by node 1
        await settle()
        mc.install_on([1, 2, 3], {1, 2, 3}, joined={1})
        mc.crash(3)                                  # before that recovery ran
        await mc.wait_running()
        with trio.fail_after(HANG):
            got = await mc.ls(2).lock(R, Mode.EX)
        assert got.granted


def _install_now(mc: MemCluster, node: int, members: set[int], left: set[int]) -> None:
    """A view handed to `node`'s lockspace at once, in the calling step (install_on
    queues it for the lockspace's event task)."""
    view = mc.next_view(members)
    ls = mc.ls(node)
    ls._on_view_change(ViewChange(view, frozenset(), frozenset(left)), ls.ls_dlm._nursery)


@trio_test
async def test_a_recovery_overtaken_as_its_barrier_passes_purges_and_grants_nothing() -> None:
    """Node 3 dies; node 1's recovery waits at barrier 1 for node 2. Node 2's status
    comes, and in the same step a newer view leaves node 1 alone without quorum (node
    2 only slow: never fenced). The status had woken the recovery before the view
    cancelled it, so it went on: every later barrier had no other member and passed
    without a checkpoint, step 4 purged node 2's locks (the newer view counted node 2
    as gone) and step 7 granted node 1's waiting EX over node 2's. After the merge
    both held R in EX (seen on real mounts: two nodes allocating one block, a
    withdraw; tests/test_cluster_quorum.py)."""
    async with memory_cluster([1, 2, 3], auto_fence=False) as mc:
        ls1, ls2 = mc.ls(1), mc.ls(2)
        await make_master(ls1, R)
        held = await ls2.lock(R, Mode.EX)
        got: list = []

        async def want_ex() -> None:
            got.append(await ls1.lock(R, Mode.EX))

        async with trio.open_nursery() as n:
            n.start_soon(want_ex)
            await settle()
            receive = Lockspace._handlers[MsgType.DLM_RECOVER_STATUS]
            overtaken: list[int] = []

            def then_alone(ls: Lockspace, sender: int, body: dict) -> None:
                receive(ls, sender, body)
                if sender == 2 and body["step"] == 1 and not overtaken:
                    overtaken.append(body["g"])
                    _install_now(mc, 1, {1}, left={2})

            ls1._handlers = {**Lockspace._handlers,
                             MsgType.DLM_RECOVER_STATUS: then_alone}
            mc.crash(3)
            mc.cluster.members[1]._publish(Fenced(mc.cluster.view.generation, frozenset({3})))
            await settle()                           # node 1 waits at barrier 1
            assert ls1.ls_barrier_sent.get(mc.cluster.view.generation) == 1
            mc.cluster.members[2]._publish(Fenced(mc.cluster.view.generation, frozenset({3})))
            await settle()
            assert overtaken and not got
            kept = [i for i in ls1.ls_table.dump(resource_key(R)) if i.nodeid == 2]
            assert kept and kept[0].grmode == Mode.EX, "node 2's EX was purged unfenced"
            mc.install_on([1, 2], {1, 2}, joined={1})   # merged back
            await mc.wait_running()
            await settle()
            assert not got, "node 1 was granted EX while node 2 holds it"
            granted = [i for i in ls1.ls_table.dump(resource_key(R))
                       if i.queue == Queue.GRANTED]
            assert [(i.nodeid, i.grmode) for i in granted] == [(2, Mode.EX)]
            await ls2.unlock(held)
            with trio.fail_after(HANG):
                while not got:
                    await trio.sleep(0.01)
        assert got[0].granted and got[0].mode == Mode.EX


@trio_test
async def test_lookups_of_a_step_six_overtaken_before_they_ran_choose_no_master(
        caplog) -> None:
    """Node 1 merges back (it must re-send its PR on R, mastered by node 2). A newer
    view leaves it alone again just as its step 6 starts the lookups for its orphans,
    before they ran: they ran anyway, with no checkpoint, under the newer view, where
    node 1 is every resource's directory node, so node 1 made itself R's master.
    After the next merge both nodes mastered R, each granting its own node (seen in
    the fuzz: two nodes holding one inode's lock in EX and PR, then a withdraw). The
    directory node says so in its log when it happens (what real-mount tests look for)."""
    caplog.set_level("ERROR", logger="clusterfs.dlm")
    async with memory_cluster([1, 2, 3]) as mc:
        ls1, ls2 = mc.ls(1), mc.ls(2)
        name = next(("inode", i) for i in range(100)      # node 3 its directory node
                    if ls1._dir_node(resource_key(("inode", i))) == 3)
        await make_master(ls2, name)
        await ls1.lock(name, Mode.PR)
        await ls2.lock(name, Mode.PR)
        await alone_without_quorum(mc, 1)
        recover_masters = ls1._recover_masters
        overtaken: list[int] = []

        async def then_alone(view) -> None:
            if not overtaken:
                overtaken.append(view.generation)
                _install_now(mc, 1, {1}, left={2, 3})
            await recover_masters(view)

        ls1._recover_masters = then_alone
        mc.install_on([1, 2, 3], {1, 2, 3}, joined={1})
        await settle()
        assert overtaken and not ls1.ls_running
        ls1._recover_masters = recover_masters
        with trio.fail_after(HANG):
            await merged_back(mc, 1)
        assert mc.several_masters() == {}
        assert "mastered by both" not in caplog.text
        assert masters(mc, name) == [2]
        with pytest.raises(WouldBlock):              # node 2 holds PR
            await ls1.lock(name, Mode.EX, try_=True)


# -- DLM_REMOVE: masters free idle resources ------------------------------------
def masters(mc: MemCluster, name: tuple) -> list[int]:
    key = resource_key(name)
    return [nid for nid in mc.nodes if key in mc.ls(nid).ls_mastered]


def directory_entries(mc: MemCluster) -> int:
    return sum(len(mc.ls(nid).ls_dir) for nid in mc.nodes)


@trio_test
async def test_idle_resources_removed_with_their_directory_entries() -> None:
    async with memory_cluster([1, 2, 3]) as mc:
        names = [("inode", i) for i in range(60)]
        for i, name in enumerate(names):
            ls = mc.ls(1 + i % 3)
            await ls.unlock(await ls.lock(name, Mode.EX))
        await settle()
        assert sum(len(mc.ls(n).ls_mastered) for n in mc.nodes) == 60
        assert directory_entries(mc) == 60
        # idle, but not yet for a whole toss period: kept (a relock costs no lookup)
        assert sum(mc.ls(n).remove_idle_resources() for n in mc.nodes) == 0
        assert sum(mc.ls(n).remove_idle_resources() for n in mc.nodes) == 60
        await settle()
        assert sum(len(mc.ls(n).ls_mastered) for n in mc.nodes) == 0
        assert sum(mc.ls(n).statistics().idle_resources for n in mc.nodes) == 0
        assert directory_entries(mc) == 0
        # held resources are never removed, and the names work again afterwards
        held = await mc.ls(2).lock(names[0], Mode.PR)
        assert sum(mc.ls(n).remove_idle_resources(everything=True) for n in mc.nodes) == 0
        assert masters(mc, names[0]) == [2]
        await mc.ls(2).unlock(held)


@trio_test
async def test_idle_resources_freed_in_batches_one_remove_per_directory_node() -> None:
    """Thousands of idle resources (after an orphan sweep) are freed TOSS_BATCH at a
    time, each batch telling every directory node in one message; the toss loop
    yields between batches, so no step holds the event loop for all of them."""
    async with memory_cluster([1, 2, 3]) as mc:
        ls = mc.ls(1)
        count = 2 * TOSS_BATCH + 10
        for i in range(count):
            await ls.unlock(await ls.lock(("inode", i), Mode.EX))
        await settle()
        assert len(ls.ls_mastered) == count
        removes: list[tuple[int, int]] = []
        send = ls._send

        def counting_send(dest: int, mtype: int, body: dict) -> None:
            if mtype == MsgType.DLM_REMOVE:
                removes.append((dest, len(body["names"])))
            send(dest, mtype, body)

        ls._send = counting_send  # type: ignore[method-assign]
        before = ls._next_toss_epoch() + 1        # everything idle
        steps = []
        while (step := ls.remove_idle_before(before, limit=TOSS_BATCH))[0]:
            steps.append(step)
        assert steps == [(TOSS_BATCH, TOSS_BATCH), (TOSS_BATCH, TOSS_BATCH), (10, 10)]
        # one message per other directory node and batch, naming all of its keys
        assert len(removes) <= 2 * len(steps)
        assert sum(n for _dest, n in removes) == sum(
            1 for i in range(count) if mc.ls(1)._dir_node(resource_key(("inode", i))) != 1)
        await settle()
        assert ls.ls_mastered == set() and directory_entries(mc) == 0
        # and the names work again
        await ls.unlock(await ls.lock(("inode", 0), Mode.PR))


@trio_test
async def test_remove_races_request_from_cached_master() -> None:
    """Node 1 still caches node 2 as master when node 2 frees the resource: its
    request is answered notmaster, it looks up again, and exactly one master
    (the one the directory names) results."""
    async with memory_cluster([1, 2, 3]) as mc:
        for rnd in range(10):
            name = ("race", rnd)
            key = resource_key(name)
            a, b = mc.ls(1), mc.ls(2)
            await b.unlock(await b.lock(name, Mode.EX))     # node 2 masters it
            await a.unlock(await a.lock(name, Mode.PR))     # node 1 caches master 2
            await settle()
            assert b.remove_idle_resources(everything=True) == 1
            # no settling: the remove is still on its way to the directory node
            lk = await a.lock(name, Mode.EX)
            await settle()
            (master,) = masters(mc, name)
            dir_node = sorted(mc.nodes)[zlib.crc32(key) % 3]
            assert mc.ls(dir_node).ls_dir[key] == master
            await a.unlock(lk)


@trio_test
async def test_dump_resource_from_a_node_whose_cached_master_freed_it() -> None:
    """Node 1 caches node 2 as the master; node 2 frees the resource (idle) and node 3
    takes it and masters it. Node 1's dump must show node 3's lock: it showed the
    former master's empty answer, and `clusterfs status` a held journal slot as free."""
    async with memory_cluster([1, 2, 3]) as mc:
        a, b, c = mc.ls(1), mc.ls(2), mc.ls(3)
        await b.unlock(await b.lock(R, Mode.EX))            # node 2 masters it
        await a.unlock(await a.lock(R, Mode.PR))            # node 1 caches master 2
        await settle()
        assert b.remove_idle_resources(everything=True) == 1
        await settle()
        held = await c.lock(R, Mode.EX)
        await settle()
        assert masters(mc, R) == [3]
        d = await a.dump_resource(R)
        assert d["master"] == 3
        assert [(lk["node"], lk["grmode"]) for lk in d["locks"]] == [(3, "EX")]
        await c.unlock(held)


@trio_test
async def test_remove_waits_while_recovering_and_lvb_goes_with_it() -> None:
    async with memory_cluster([1, 2, 3], auto_fence=False) as mc:
        a = mc.ls(1)
        lk = await a.lock(R, Mode.EX)
        lk.lvb = b"kept while idle"
        await a.unlock(lk)
        lk = await a.lock(R, Mode.PR)
        assert lk.lvb.rstrip(b"\0") == b"kept while idle"
        await a.unlock(lk)
        assert a.remove_idle_resources(everything=True) == 1
        await settle()
        lk = await mc.ls(3).lock(R, Mode.PR)
        assert lk.lvb == bytes(32)                # (pin a value with an NL lock)
        await mc.ls(3).unlock(lk)
        mc.crash(2)
        await settle()
        assert not mc.ls(3).ls_running                  # recovery waits for fencing
        assert mc.ls(3).remove_idle_resources(everything=True) == 0
        mc.cluster.fence_done({2})
        await mc.wait_running()
        assert mc.ls(3).remove_idle_resources(everything=True) == 1


@trio_test
async def test_a_released_or_refused_lock_leaves_no_reference_cycle() -> None:
    """A lock handle and its record (Lkb) pointed at each other, so every lock a node
    released stayed until a garbage collection found the cycle: under load a node's
    full collections freed hundreds of thousands of objects, with the event loop
    stopped. Released, or refused (a try lock that would block, a conversion
    deadlock), nothing of a lock may be left for the collector."""
    import gc

    async with memory_cluster([1, 2]) as mc:
        a, b = mc.ls(1), mc.ls(2)
        held = await b.lock(("inode", 999), Mode.EX)
        gc.collect()
        gc.disable()
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            for i in range(50):
                lk = await a.lock(("inode", i), Mode.EX, on_blocking=lambda m: None)
                await a.convert(lk, Mode.PR)
                await a.unlock(lk)
                remote = await a.lock(("inode", 999 - i - 1), Mode.PR)   # b masters some
                await a.unlock(remote)
                with pytest.raises(WouldBlock):
                    await a.lock(("inode", 999), Mode.PR, try_=True)
            for i in range(20):                      # conversion deadlocks, refused
                name = ("inode", 2000 + i)
                la, lb = await a.lock(name, Mode.PR), await b.lock(name, Mode.PR)
                async with trio.open_nursery() as n:
                    n.start_soon(a.convert, la, Mode.EX)
                    await settle()
                    with pytest.raises(ConversionDeadlock):
                        await b.convert(lb, Mode.EX)
                    await b.unlock(lb)
                await a.unlock(la)
            gc.collect()
            left = [type(x).__name__ for x in gc.garbage
                    if type(x).__name__ in ("Lock", "Lkb", "Event")]
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
            gc.enable()
        assert left == [], f"{len(left)} objects of released locks in cycles: {left[:6]}"
        await b.unlock(held)
