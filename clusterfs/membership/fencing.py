"""Fencing: the coordinator of a quorate view fences the nodes it removed, then
tells the members, who publish Fenced (see service.py, "Fencing").
"""

from __future__ import annotations

from collections.abc import Mapping

import trio

from clusterfs.comms.interface import Envelope
from clusterfs.membership.state import MEMBER, MembershipState, body_key_of_base, guarded, log
from clusterfs.membership.view import Fenced
from clusterfs.wire.types import MsgType


class Fencing(MembershipState):
    def _maybe_fence(self) -> None:
        v = self.view
        if (self.state != MEMBER or not v.quorate or v.coordinator != self.node_id
                or not self._pending_fence or self._fencing_gen == v.generation):
            return
        # Fence only once every member has confirmed (by a heartbeat sent after our
        # install) that it holds exactly this view: a coordinator whose commit lost a
        # race against a competing proposal must not fence anybody.
        for n in v.members:
            p = self._peers.get(n)
            if n != self.node_id and (p is None or p.gen != v.generation
                                      or p.members != v.members
                                      or p.last_seen < self._installed_at):
                return
        assert self._nursery is not None
        self._fencing_gen = v.generation
        self._nursery.start_soon(self._fence, v.generation, dict(self._pending_fence))

    async def _fence(self, gen: int, incarnations: Mapping[int, int]) -> None:
        """Fence each removed node's incarnation (node -> incarnation the view saw)."""
        nodes = frozenset(incarnations)
        for n in sorted(nodes):
            while True:
                if self.view.generation != gen:
                    log.info("node %d gen %d: fencing for view %d superseded", self.node_id,
                             self.view.generation, gen)
                    return
                log.info("node %d gen %d: fencing node %d (incarnation %#x)", self.node_id,
                         gen, n, incarnations[n])
                try:
                    if self.fence_agent is not None:
                        await self.fence_agent.fence(n, gen, incarnations[n])
                    break
                except Exception as exc:  # an agent failure must not kill membership
                    log.error("node %d gen %d: fencing node %d failed: %s; retrying",
                              self.node_id, gen, n, exc)
                    await trio.sleep(self.interval)
        if self.view.generation != gen:
            return
        log.info("node %d gen %d: fencing of %s done; telling members", self.node_id, gen,
                 sorted(nodes))
        body = {"gen": gen, "nodes": sorted(nodes), "inc": self.incarnation}
        for n in sorted(self.view.members):
            if n != self.node_id:
                await self._send(n, MsgType.FENCE_DONE, body)
        self._fence_done(gen, frozenset(nodes))

    @guarded
    async def _on_fence_done(self, env: Envelope) -> None:
        if (self.state != MEMBER or env.sender != self.view.coordinator
                or int(env.body["inc"]) != self._incs.get(env.sender)):
            log.warning("node %d gen %d: FENCE_DONE from node %d, not my coordinator; ignored",
                        self.node_id, self.view.generation, env.sender)
            return
        if self._committed_elsewhere(env.sender):
            log.info("node %d gen %d: FENCE_DONE from node %d left to the next view (we "
                     "committed one of another coordinator)", self.node_id,
                     self.view.generation, env.sender)
            return
        self._fence_done(int(env.body["gen"]), frozenset(int(n) for n in env.body["nodes"]))

    def _committed_elsewhere(self, fencer: int) -> bool:
        """We committed a view that follows ours, proposed by another node than the one
        that fenced: its coordinator activates it with the Fenced it knows of (it learns
        ours from our commit answer), so delivering this one now could make our events
        differ from the other members'. Only for a failure timeout: a view that is not
        activated by then is dead, and the Fenced must not be lost."""
        t = self._tentative
        return (t is not None and int(t["coord"]) != fencer
                and body_key_of_base(t) == self._view_key
                and trio.current_time() - self._committed_at < self.timeout)

    def _fence_done(self, gen: int, nodes: frozenset[int]) -> None:
        # one Fenced per view: a late FENCE_DONE after a catch-up is not delivered twice
        if self.state != MEMBER or gen != self.view.generation or self._fenced_here is not None:
            log.info("node %d gen %d: ignoring FENCE_DONE of view %d", self.node_id,
                     self.view.generation, gen)
            return
        for n in nodes:
            self._pending_fence.pop(n, None)
        self._fenced_here = sorted(nodes)
        log.info("node %d gen %d: fenced %s", self.node_id, gen, sorted(nodes))
        self._publish(Fenced(gen, nodes))
