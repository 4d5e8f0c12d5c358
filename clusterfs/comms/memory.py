"""An in-memory transport: many nodes in one trio run, for tests.

Same contract as the TCP transport (clusterfs.comms.interface), plus fault
injection: cut() and heal() a link, crash() a node (its messages vanish), hold() and
release() a node (a SIGSTOP over TCP: its messages, both ways, wait and arrive late). With
`refuse_crashed`, a crashed node is reported refused to the nodes still linked to
it, as a host reports a killed process (TCP's connection refused); without it a
crash is silent, like a power cut.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import Any

import trio

from clusterfs.comms.interface import Envelope, Handler, InlineHandler, RefusalListener
from clusterfs.errors import PeerUnreachable


class MemoryNetwork:
    def __init__(self, *, refuse_crashed: bool = False) -> None:
        self.endpoints: dict[int, MemoryEndpoint] = {}
        self.refuse_crashed = refuse_crashed
        self.crashed_at: dict[int, float] = {}
        self._cut: set[frozenset[int]] = set()
        # held nodes (a SIGSTOP): what they send or are sent waits, in order, per pair
        self._held: set[int] = set()
        self._waiting: dict[tuple[int, int], list[Envelope]] = {}
        self._nursery: trio.Nursery | None = None

    def endpoint(self, node_id: int) -> MemoryEndpoint:
        if self._nursery is None:
            raise RuntimeError("start the network first: async with net.running()")
        ep = MemoryEndpoint(self, node_id)
        self.endpoints[node_id] = ep
        self.crashed_at.pop(node_id, None)
        self._nursery.start_soon(ep._deliver_loop)
        return ep

    def running(self) -> _Running:
        return _Running(self)

    def cut(self, a: int, b: int) -> None:
        self._cut.add(frozenset((a, b)))

    def heal(self, a: int, b: int) -> None:
        self._cut.discard(frozenset((a, b)))

    def hold(self, node: int) -> None:
        """The node stops as a SIGSTOPped process does over TCP: nothing it sends or is
        sent from now on is lost, it waits (per pair, in order) until release()."""
        self._held.add(node)

    def release(self, node: int) -> None:
        """Deliver, in order, what waited on the node's links (those whose other end is
        not held itself)."""
        self._held.discard(node)
        for (src, dst), envs in list(self._waiting.items()):
            if node in (src, dst) and src not in self._held and dst not in self._held:
                del self._waiting[(src, dst)]
                peer = self.endpoints.get(dst)
                for env in envs:
                    if peer is not None and not peer.crashed:
                        with contextlib.suppress(trio.ClosedResourceError,
                                                 trio.BrokenResourceError, trio.WouldBlock):
                            peer._inbox_send.send_nowait(env)

    def _held_back(self, env: Envelope, dest: int) -> bool:
        """Keep env for release() if either end is held, or older messages of its pair
        still wait (they go first)."""
        pair = (env.sender, dest)
        if env.sender in self._held or dest in self._held or pair in self._waiting:
            self._waiting.setdefault(pair, []).append(env)
            return True
        return False

    def isolate(self, node: int) -> None:
        for other in self.endpoints:
            if other != node:
                self.cut(node, other)

    def crash(self, node: int) -> None:
        ep = self.endpoints.pop(node, None)
        if ep is not None:
            ep.crashed = True
            ep._inbox_send.close()
            self.crashed_at[node] = trio.current_time()
            if self.refuse_crashed:
                for other in list(self.endpoints.values()):
                    if self.linked(node, other.node_id):
                        other._tell_refused(node)

    def linked(self, a: int, b: int) -> bool:
        return frozenset((a, b)) not in self._cut


class _Running:
    def __init__(self, net: MemoryNetwork) -> None:
        self.net = net
        self._cm = trio.open_nursery()

    async def __aenter__(self) -> MemoryNetwork:
        self.net._nursery = await self._cm.__aenter__()
        return self.net

    async def __aexit__(self, *exc: object) -> bool | None:
        for ep in list(self.net.endpoints.values()):
            ep._inbox_send.close()
        return await self._cm.__aexit__(*exc)


class MemoryEndpoint:
    def __init__(self, net: MemoryNetwork, node_id: int) -> None:
        self.net = net
        self.node_id = node_id
        self.generation = 0
        self.crashed = False
        self.sent = 0
        self._handlers: dict[int, Handler] = {}
        self._inline: dict[int, InlineHandler] = {}
        self._refusal_listeners: list[RefusalListener] = []
        self._inbox_send, self._inbox = trio.open_memory_channel[Envelope](10_000)

    async def send(self, dest: int, mtype: int, body: Any) -> None:
        self.send_nowait(dest, mtype, body)

    def send_nowait(self, dest: int, mtype: int, body: Any) -> None:
        if self.crashed:
            raise PeerUnreachable(f"node {self.node_id} is down")
        peer = self.net.endpoints.get(dest)
        if peer is None or not self.net.linked(self.node_id, dest):
            raise PeerUnreachable(f"node {dest} unreachable from {self.node_id}")
        self.sent += 1
        env = Envelope(self.node_id, self.generation, mtype, body)
        if self.net._held_back(env, dest):
            return
        try:
            peer._inbox_send.send_nowait(env)
        except (trio.ClosedResourceError, trio.BrokenResourceError, trio.WouldBlock) as exc:
            raise PeerUnreachable(f"node {dest}: {exc!r}") from exc

    def register(self, mtypes: Iterable[int], handler: Handler) -> None:
        for t in mtypes:
            self._inline.pop(int(t), None)
            self._handlers[int(t)] = handler

    def register_inline(self, mtypes: Iterable[int], handler: InlineHandler) -> None:
        # one delivery task serves every sender here, so inline handlers run in it
        for t in mtypes:
            self._handlers.pop(int(t), None)
            self._inline[int(t)] = handler

    def refused_at(self, dest: int) -> float | None:
        if not self.net.refuse_crashed or not self.net.linked(self.node_id, dest):
            return None
        return self.net.crashed_at.get(dest)

    def on_refused(self, listener: RefusalListener) -> None:
        self._refusal_listeners.append(listener)

    def _tell_refused(self, dest: int) -> None:
        for listener in self._refusal_listeners:
            listener(dest)

    async def _deliver_loop(self) -> None:
        async for env in self._inbox:
            if self.crashed or not self.net.linked(env.sender, self.node_id):
                continue  # a message in flight on a cut link is lost
            inline = self._inline.get(env.type)
            handler = self._handlers.get(env.type)
            if inline is not None:
                inline(env)
            elif handler is not None:
                await handler(env)
