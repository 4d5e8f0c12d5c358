"""The DLM over real TCP endpoints on 127.0.0.1, in one trio run, with one view.

A connection that breaks while both processes live on (a reset, a short network
cut) must lose no DLM message: a lost request, grant, unlock or blocking callback
hangs a lock for good, and no view change comes to resynchronise the pair (the
peer never left the view). Here connections are reset from underneath while
three nodes lock and unlock shared resources: every operation must complete and
the masters' tables must agree with what the owners hold.
"""

from __future__ import annotations

import random
import socket
import struct
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import trio
from torture import Checker
from trioutil import trio_test, wait_until

from clusterfs.comms.localcluster import local_config
from clusterfs.comms.tcp import TcpEndpoint, open_tcp_endpoint
from clusterfs.dlm.interface import Mode, resource_key
from clusterfs.dlm.lockspace import Lockspace, open_dlm, wait_running
from clusterfs.membership.static import StaticCluster

NODES = [1, 2, 3]
RESOURCES = [("inode", i) for i in range(6)]


@asynccontextmanager
async def tcp_dlm_cluster(node_ids: list[int]
                          ) -> AsyncIterator[tuple[dict[int, TcpEndpoint], dict[int, Lockspace]]]:
    """A lockspace on each node, over TCP endpoints, under one static view."""
    cfg = local_config(node_ids)
    cluster = StaticCluster(node_ids)
    async with AsyncExitStack() as stack:
        eps = {n: await stack.enter_async_context(open_tcp_endpoint(cfg, n)) for n in node_ids}
        await wait_until(lambda: all(ep.peer_state(p) == "up" for ep in eps.values()
                                     for p in node_ids if p != ep.node_id), timeout=10)
        spaces = {}
        for n in node_ids:
            dlm = await stack.enter_async_context(open_dlm(eps[n], cluster.membership(n)))
            spaces[n] = await dlm.new_lockspace("default")
        with trio.fail_after(10):
            for ls in spaces.values():
                await wait_running(ls)
        yield eps, spaces


def reset_connection(ep: TcpEndpoint, dest: int) -> bool:
    """Reset ep's connection to dest from underneath (SO_LINGER 0: a RST, and what
    either kernel still held for it is thrown away). False if none is up now."""
    link = ep._peers[dest].link
    if link is None or link.broken is not None or link.sock.fileno() < 0:
        return False
    link.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    trio.lowlevel.notify_closing(link.sock)
    link.sock.close()
    return True


async def reset_connections(eps: dict[int, TcpEndpoint], rng: random.Random,
                            count: list[int]) -> None:
    while True:
        await trio.sleep(rng.uniform(0.01, 0.04))
        a, b = rng.sample(sorted(eps), 2)
        count[0] += reset_connection(eps[a], b)


async def worker(ls: Lockspace, node: int, w: int, rounds: int, rng: random.Random,
                 checker: Checker, basts: list[int]) -> None:
    for _ in range(rounds):
        name = rng.choice(RESOURCES)
        mode = rng.choice([Mode.PR, Mode.PR, Mode.EX])
        lock = await ls.lock(name, mode, on_blocking=lambda *_: basts.append(node))
        checker.granted(node, w, name, mode, (0, 2**64 - 1))
        await trio.sleep(rng.uniform(0, 0.002))
        checker.releasing(node, w)
        await ls.unlock(lock)


def master_tables_agree(spaces: dict[int, Lockspace], held: dict[int, dict]) -> list[str]:
    """Every resource has one master, whose grant queue holds exactly the locks
    the owners hold (node, mode); nothing waits anywhere."""
    problems = []
    for name in RESOURCES:
        key = resource_key(name)
        masters = [n for n, ls in spaces.items() if key in ls.ls_mastered]
        if len(masters) != 1:
            problems.append(f"{name}: masters {masters}")
            continue
        infos = spaces[masters[0]].dump_local(key) or []
        at_master = sorted((i.nodeid, i.grmode) for i in infos)
        owners = sorted((n, lock.mode) for n, locks in held.items()
                        for lock_name, lock in locks.items() if lock_name == name)
        if at_master != owners:
            problems.append(f"{name}: master {masters[0]} has {at_master}, owners {owners}")
    for n, ls in spaces.items():
        waiting = ls.statistics().owned_waiting
        if waiting:
            problems.append(f"node {n}: {waiting} requests still waiting")
    return problems


@trio_test
async def test_lock_traffic_survives_connections_reset_under_it() -> None:
    rng = random.Random(7)
    checker = Checker()
    basts: list[int] = []
    resets = [0]
    async with tcp_dlm_cluster(NODES) as (eps, spaces):
        async with trio.open_nursery() as chaos:
            chaos.start_soon(reset_connections, eps, random.Random(8), resets)
            with trio.fail_after(60):
                async with trio.open_nursery() as n:
                    for node in NODES:
                        for w in range(3):
                            n.start_soon(worker, spaces[node], node, w, 150,
                                         random.Random(rng.random()), checker, basts)
            chaos.cancel_scope.cancel()
        assert resets[0] >= 10, resets
        assert not checker.violations, checker.violations[:5]
        assert checker.grants == len(NODES) * 3 * 150
        assert basts, "no blocking callback was sent"
        # one more round, with connections reset while the grants are on their way:
        # each node holds PR on every resource; the masters must agree
        held: dict[int, dict] = {n: {} for n in NODES}

        async def hold_all(node: int) -> None:
            for name in RESOURCES:
                held[node][name] = await spaces[node].lock(name, Mode.PR)

        with trio.fail_after(30):
            async with trio.open_nursery() as n:
                for node in NODES:
                    n.start_soon(hold_all, node)
                for a in NODES:
                    for b in NODES:
                        if a != b:
                            reset_connection(eps[a], b)
        await wait_until(lambda: not master_tables_agree(spaces, held), timeout=5)
        for ep in eps.values():
            for peer in ep.statistics().peers:
                assert peer.connects > 1 or peer.node_id == ep.node_id
