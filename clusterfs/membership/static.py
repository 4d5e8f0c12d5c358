"""StaticMembership: views set by hand, for tests of the layers above membership.

One shared `StaticCluster` drives every node's membership, so every node sees
the same events in the same order, exactly as the real service promises.
"""

from __future__ import annotations

import trio

from clusterfs.membership.view import Event, ExpelledEvent, Fenced, View, ViewChange


class StaticCluster:
    def __init__(self, nodes: list[int], *, auto_fence: bool = True) -> None:
        self.cluster_size = len(nodes)
        self.auto_fence = auto_fence
        self.view = View(1, frozenset(nodes), True, self.cluster_size)
        self.members: dict[int, StaticMembership] = {}
        # (suspecting node, suspect, why) for every suspect() call: views here change
        # only by hand, so a suspicion is only recorded
        self.suspicions: list[tuple[int, int, str]] = []
        # node -> when it was last "heard" (trio time), set by tests; a node not in it
        # is silent (there are no heartbeats here)
        self.heard: dict[int, float] = {}

    def membership(self, node_id: int) -> StaticMembership:
        m = StaticMembership(self, node_id)
        self.members[node_id] = m
        return m

    def set_members(self, nodes: set[int] | frozenset[int]) -> View:
        old = self.view
        new = frozenset(nodes)
        self.view = View(old.generation + 1, new, 2 * len(new) > self.cluster_size,
                         self.cluster_size)
        change = ViewChange(self.view, new - old.members, old.members - new)
        for nid, m in self.members.items():
            if nid in new:
                m._publish(change)
            elif nid in old.members:
                m._publish(ExpelledEvent(self.view.generation))
        if self.auto_fence and change.left:
            self.fence_done(change.left)
        return self.view

    def fence_done(self, nodes: frozenset[int] | set[int]) -> None:
        ev = Fenced(self.view.generation, frozenset(nodes))
        for nid, m in self.members.items():
            if nid in self.view.members:
                m._publish(ev)


class StaticMembership:
    def __init__(self, cluster: StaticCluster, node_id: int) -> None:
        self.cluster = cluster
        self.node_id = node_id
        self._subscribers: list[trio.MemorySendChannel[Event]] = []

    @property
    def view(self) -> View:
        return self.cluster.view

    def subscribe(self) -> trio.MemoryReceiveChannel[Event]:
        send, recv = trio.open_memory_channel[Event](1000)
        v = self.cluster.view
        send.send_nowait(ViewChange(v, v.members, frozenset()))
        self._subscribers.append(send)
        return recv

    def _publish(self, ev: Event) -> None:
        for s in self._subscribers:
            try:
                s.send_nowait(ev)
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                pass

    def suspect(self, node: int, why: str = "", *, quiet: float | None = None) -> None:
        if quiet is None or self.silent_for(node) >= quiet:   # (no later look here)
            self.cluster.suspicions.append((self.node_id, node, why))

    def silent_for(self, node: int) -> float:
        heard = self.cluster.heard.get(node)
        return float("inf") if heard is None else trio.current_time() - heard

    async def wait_quorum(self) -> View:
        while not self.cluster.view.quorate:
            await trio.sleep(0.01)
        return self.cluster.view
