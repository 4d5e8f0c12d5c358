"""Many DLM nodes in one trio run (tier 2): MemoryNetwork + StaticCluster.

A test helper (it was clusterfs/dlm/testing.py; test scaffolding does not ship
in the package): used by tests/test_dlm.py and the in-process torture
(tests/torture.py); crash(), join() and the StaticCluster's set_members() drive
failures by hand.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import trio

from clusterfs.comms.memory import MemoryNetwork
from clusterfs.dlm.interface import Mode, conflicts
from clusterfs.dlm.lkb import Status
from clusterfs.dlm.lockspace import Dlm, Lockspace, open_dlm
from clusterfs.membership.static import StaticCluster
from clusterfs.membership.view import Fenced, View, ViewChange


@dataclass(eq=False)
class MemNode:
    node_id: int
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    dlm: Dlm | None = None
    ls: Lockspace | None = None


class MemCluster:
    def __init__(self, net: MemoryNetwork, cluster: StaticCluster,
                 nursery: trio.Nursery,
                 dir_hint: Callable[[bytes], int | None] | None = None,
                 servers: frozenset[int] = frozenset(),
                 answer_timeout: float | None = 1.0) -> None:
        self.dir_hint = dir_hint
        self.answer_timeout = answer_timeout   # watch.py's (None: never suspect)
        self.net = net
        self.servers = servers           # the storage group's block servers, if any
        self.cluster = cluster
        self.nursery = nursery
        self.nodes: dict[int, MemNode] = {}

    def ls(self, node_id: int) -> Lockspace:
        ls = self.nodes[node_id].ls
        assert ls is not None
        return ls

    async def start(self, node_id: int) -> MemNode:
        node = MemNode(node_id)
        self.nodes[node_id] = node
        ep = self.net.endpoint(node_id)
        mem = self.cluster.membership(node_id)
        ready = trio.Event()

        async def run() -> None:
            with node.scope:
                async with open_dlm(ep, mem, self.servers, self.answer_timeout) as dlm:
                    node.dlm = dlm
                    node.ls = await dlm.new_lockspace("default", dir_hint=self.dir_hint)
                    ready.set()
                    await trio.sleep_forever()

        self.nursery.start_soon(run)
        await ready.wait()
        return node

    def crash(self, node_id: int, *, remove: bool = True) -> None:
        """The node dies at once: its messages vanish, its tasks stop."""
        self.net.crash(node_id)
        node = self.nodes.pop(node_id)
        node.scope.cancel()
        self.cluster.members.pop(node_id, None)
        if remove:
            self.cluster.set_members(self.cluster.view.members - {node_id})

    async def join(self, node_id: int) -> MemNode:
        node = await self.start(node_id)
        self.cluster.set_members(self.cluster.view.members | {node_id})
        return node

    def install_on(self, nodes: Iterable[int], members: Iterable[int], *,
                   joined: Iterable[int] = (), left: Iterable[int] = ()) -> View:
        """A view installed by `nodes` only, with the events the real membership would
        give them: StaticCluster gives every node the same view, but a partition's
        side goes on alone (a node without quorum while the others still hold the old
        view), and a merge back names the merged node in `joined` on every member
        (docs/cluster.md). Becomes the cluster's view (what wait_running waits for)."""
        view = self.next_view(members)
        change = ViewChange(view, frozenset(joined), frozenset(left))
        for nid in nodes:
            self.cluster.members[nid]._publish(change)
        return view

    async def freeze_and_merge(self, rng: random.Random, lone: int, frozen: int,
                               dead: int, *, held: bool) -> None:
        """As the real mounts saw it (tests/test_cluster_quorum.py), `dead` crashed by
        the caller in the same instant: `frozen` freezes (`held`: what it sends and is
        sent arrives late, as over TCP across a SIGSTOP; else cut off, its messages
        lost, as across a network cut); `lone` goes on alone without quorum while
        `frozen` still holds the old view and goes on locking what it can; `frozen`
        wakes, goes on a moment in its old view, and the two merge (`lone` named as
        joined), `dead` is fenced; then `lone` drops `frozen` and merges again, 0 to 2
        times (a suspicion outliving the merge). Returns once the pair runs."""
        if held:
            self.net.hold(frozen)
        else:
            self.net.isolate(frozen)
        self.install_on([lone], {lone}, left={frozen, dead})
        await trio.sleep(rng.random() * 0.2)
        if held:
            self.net.release(frozen)
            await trio.sleep(rng.random() * 0.05)
        else:
            self.net.heal(frozen, lone)
        pair = [lone, frozen]
        view = self.install_on(pair, set(pair), joined={lone}, left={dead})
        await trio.sleep(rng.random() * 0.05)
        for n in pair:
            self.cluster.members[n]._publish(Fenced(view.generation, frozenset({dead})))
        for _ in range(rng.randrange(3)):
            await trio.sleep(rng.random() * 0.1)
            self.install_on([lone], {lone}, left={frozen})
            await trio.sleep(rng.random() * 0.1)
            self.install_on(pair, set(pair), joined={lone})
        await self.wait_running(30)

    def started(self) -> list[tuple[int, Lockspace]]:
        """The live nodes whose lockspace is up (a node joining has none yet)."""
        return [(nid, node.ls) for nid, node in sorted(self.nodes.items())
                if node.ls is not None]

    def several_masters(self) -> dict[bytes, list[int]]:
        """Resources that more than one live node masters (a lost DLM_REMOVE race, a
        bad recovery), with those nodes."""
        seen: dict[bytes, list[int]] = {}
        for nid, ls in self.started():
            for key in ls.ls_mastered:
                seen.setdefault(key, []).append(nid)
        return {key: masters for key, masters in seen.items() if len(masters) > 1}

    def running_alike(self) -> bool:
        """Every live node's lockspace runs, in the cluster's current view (no
        recovery under way anywhere: what a master check may rely on)."""
        g = self.cluster.view.generation
        return all(n.ls is not None and n.ls.ls_running and n.ls.ls_view is not None
                   and n.ls.ls_view.generation == g for n in self.nodes.values())

    def conflicting_holds(self) -> list[str]:
        """Locks two live nodes hold at once that conflict (one resource, overlapping
        ranges, incompatible modes), as their owners see them. An owner lowers its
        mode (or drops the lock) before it tells the master, and learns of a grant
        only after the master made it: the owners' view is never ahead of the
        master's, so a conflict seen here was real, whenever it is looked at."""
        held: dict[bytes, list[tuple[int, Mode, tuple[int, int]]]] = {}
        for nid, ls in self.started():
            for lkb in ls.ls_lkbs.values():
                if lkb.lkb_grmode is not None and lkb.lkb_status != Status.WAITING:
                    held.setdefault(lkb.lkb_key, []).append(
                        (nid, lkb.lkb_grmode, lkb.lkb_lock.range))
        found = []
        for key, holds in held.items():
            for at, (n1, m1, r1) in enumerate(holds):
                found += [f"{key!r}: node {n1} holds {m1.name} {r1}, node {n2} "
                          f"{m2.name} {r2}" for n2, m2, r2 in holds[at + 1:]
                          if n2 != n1 and conflicts(m1, r1, m2, r2)]
        return found

    def next_view(self, members: Iterable[int]) -> View:
        """The cluster's next view, of `members` (quorate by majority), made current
        (what wait_running waits for); handing it to the nodes is the caller's."""
        members = frozenset(members)
        self.cluster.view = View(self.cluster.view.generation + 1, members,
                                 2 * len(members) > self.cluster.cluster_size,
                                 self.cluster.cluster_size)
        return self.cluster.view

    async def wait_running(self, timeout: float = 10) -> None:
        try:
            with trio.fail_after(timeout):
                for node in list(self.nodes.values()):
                    if node.node_id in self.cluster.view.members:
                        assert node.ls is not None
                        while not (node.ls.ls_running and node.ls.ls_view is not None and
                                   node.ls.ls_view.generation
                                   == self.cluster.view.generation):
                            await trio.sleep(0.001)
        except trio.TooSlowError:
            raise AssertionError("recovery did not finish:\n" + self.dump()) from None

    def dump(self) -> str:
        lines = [f"cluster view {self.cluster.view}"]
        for nid, node in sorted(self.nodes.items()):
            ls = node.ls
            if ls is None:
                continue
            g = ls.ls_recover_gen
            lines.append(
                f"node {nid}: running={ls.ls_running} view_gen="
                f"{ls.ls_view.generation if ls.ls_view else None} recover_gen={g} "
                f"need_fence={sorted(ls.ls_need_fence)} barrier_sent={ls.ls_barrier_sent.get(g)} "
                f"status={ {k: sorted(v) for k, v in ls.ls_recover_status.items() if k[0] == g} } "
                f"dir_ready={ls.ls_dir_ready} lookups={list(ls.ls_lookups)} "
                f"rec_lookups={len(ls.ls_rec_lookups)}")
        return "\n".join(lines)


@asynccontextmanager
async def memory_cluster(node_ids: list[int], *, auto_fence: bool = True,
                         dir_hint: Callable[[bytes], int | None] | None = None,
                         servers: frozenset[int] = frozenset(),
                         answer_timeout: float | None = 1.0
                         ) -> AsyncIterator[MemCluster]:
    async with MemoryNetwork().running() as net:
        cluster = StaticCluster(node_ids, auto_fence=auto_fence)
        async with trio.open_nursery() as nursery:
            mc = MemCluster(net, cluster, nursery, dir_hint, servers, answer_timeout)
            for nid in node_ids:
                await mc.start(nid)
            await mc.wait_running()
            yield mc
            nursery.cancel_scope.cancel()

