"""Tier 2: lock grants name the preferred block server of their resource (proxy I/O,
clusterfs/dlm/routing.py), many DLM nodes in one trio run (tests/dlmcluster.py).

Nodes 1 and 2 are the storage group's servers, node 3 a proxy: what its grants name
is what its I/O under those locks is routed to (the real mounts are in
test_proxy.py)."""

from __future__ import annotations

import trio
import trio.testing
from dlmcluster import MemCluster, memory_cluster
from trioutil import trio_test

from clusterfs.dlm.interface import Lock, Mode, resource_key
from clusterfs.dlm.preferred import preferred_server, server_order

SERVERS = frozenset({1, 2})
NAMES = [("rgrp", i) for i in range(40)]


async def settle() -> None:
    for _ in range(5):
        await trio.testing.wait_all_tasks_blocked(0.01)


def expected(name: tuple, servers=SERVERS) -> int:
    server = preferred_server(resource_key(name), servers)
    assert server is not None
    return server


async def lock_all(mc: MemCluster, node: int, mode: Mode = Mode.EX) -> dict[tuple, Lock]:
    """Node `node` locks every name; masters spread over the three nodes (the first
    asker of a resource masters it)."""
    for i, name in enumerate(NAMES):
        first = mc.ls(1 + i % 3)
        await first.unlock(await first.lock(name, Mode.NL))
    return {name: await mc.ls(node).lock(name, mode) for name in NAMES}


def test_the_order_is_rendezvous_hashing():
    """A server leaving moves only its own resources; every order holds each server."""
    keys = [resource_key(n) for n in NAMES]
    for key in keys:
        assert sorted(server_order(key, {1, 2, 3})) == [1, 2, 3]
        full = preferred_server(key, {1, 2, 3})
        if full != 3:
            assert preferred_server(key, {1, 2}) == full       # not 3's: unmoved
        assert preferred_server(key, {1, 2, 3}, avoid=[full]) == server_order(
            key, {1, 2, 3})[1]
    assert preferred_server(keys[0], {1}, avoid=[1]) == 1        # nothing else left
    assert preferred_server(keys[0], ()) is None
    assert {preferred_server(k, {1, 2}) for k in keys} == {1, 2}  # spread


@trio_test
async def test_grants_name_the_preferred_server_spread_over_the_servers() -> None:
    async with memory_cluster([1, 2, 3], servers=SERVERS) as mc:
        heard: dict[bytes, int] = {}
        mc.ls(3).on_preferred = heard.__setitem__
        locks = await lock_all(mc, 3)
        named = {name: lock.server for name, lock in locks.items()}
        assert named == {name: expected(name) for name in NAMES}
        assert set(named.values()) == {1, 2}
        assert heard == {resource_key(n): s for n, s in named.items()}
        # a grant that waited (DLM_GRANT) names it too, and so does a conversion
        name = NAMES[5]
        await mc.ls(3).unlock(locks[name])
        held = await mc.ls(1).lock(name, Mode.EX)
        got: list[Lock] = []
        async with trio.open_nursery() as n:
            n.start_soon(lambda: _append(got, mc.ls(3).lock(name, Mode.PR)))
            await settle()
            assert not got
            await mc.ls(1).unlock(held)
        assert got[0].server == expected(name)
        got[0].server = None
        await mc.ls(3).convert(got[0], Mode.EX)
        assert got[0].server == expected(name)


async def _append(out: list, awaitable) -> None:
    out.append(await awaitable)


@trio_test
async def test_after_a_server_dies_the_grants_name_the_other() -> None:
    async with memory_cluster([1, 2, 3], servers=SERVERS) as mc:
        heard: dict[bytes, int] = {}
        mc.ls(3).on_preferred = heard.__setitem__
        locks = await lock_all(mc, 3, Mode.PR)
        assert any(lock.server == 1 for lock in locks.values())
        mc.crash(1)
        await mc.wait_running()
        await settle()
        assert {lock.server for lock in locks.values()} == {2}   # held ones, named again
        assert set(heard.values()) == {2}
        assert set(mc.ls(3).preferred_servers().values()) == {2}
        fresh = await mc.ls(3).lock(("inode", 99), Mode.EX)       # and new grants
        assert fresh.server == 2


@trio_test
async def test_a_silent_server_is_avoided_when_asked() -> None:
    """The proxy found a server silent while the view still holds it: the masters
    name the next server of each resource that named it, and only of those."""
    async with memory_cluster([1, 2, 3], servers=SERVERS) as mc:
        locks = await lock_all(mc, 3)
        named_1 = {resource_key(n) for n, lock in locks.items() if lock.server == 1}
        heard: dict[bytes, int] = {}
        mc.ls(3).on_preferred = heard.__setitem__
        mc.ls(3).reprefer(1)
        await settle()
        assert {name: lock.server for name, lock in locks.items()} == dict.fromkeys(
            NAMES, 2)
        assert heard == dict.fromkeys(named_1, 2)                 # those, and only those
        assert mc.cluster.view.members == {1, 2, 3}               # nobody removed


@trio_test
async def test_without_a_storage_group_grants_name_nobody() -> None:
    async with memory_cluster([1, 2]) as mc:
        lock = await mc.ls(2).lock(("inode", 1), Mode.EX)
        assert lock.server is None
        assert mc.ls(1).ls_lock_keys == {} and mc.ls(2).ls_lock_keys == {}
