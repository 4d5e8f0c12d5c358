"""Heartbeats and failure detection: who is alive, judged only over time in which
we could have heard them; telling a removed incarnation it was expelled; sending
a view again to a member that missed its activation (see service.py).
"""

from __future__ import annotations

import math

import trio

from clusterfs.comms.interface import Envelope
from clusterfs.membership.installation import ViewInstallation
from clusterfs.membership.state import EXPELLED, MEMBER, PeerInfo, guarded, log
from clusterfs.wire.types import MsgType


class FailureDetection(ViewInstallation):
    async def _heartbeat(self) -> None:
        body = self._heartbeat_body()
        for n in self.node_ids:
            if n != self.node_id:
                await self._send(n, MsgType.HEARTBEAT, body)

    def _discount_stall(self) -> None:
        """If our own loop did not run for a while, that time is not a peer's silence.

        Heartbeats that arrived while we were stalled (a loaded machine, a long GC,
        SIGSTOP) are still waiting in our sockets and inbox; judging peers before we
        have read them would remove live nodes. Every peer gets the stalled time back.
        """
        now = trio.current_time()
        excess = now - self._last_tick - self.interval
        self._last_tick = now
        if excess <= self.interval:
            return
        log.info("node %d gen %d: our loop stalled %.2f s; not counting it as peers' "
                 "silence", self.node_id, self.view.generation, excess)
        self._judge_from = min(now, self._judge_from + excess)
        for p in self._peers.values():
            p.last_seen = min(now, p.last_seen + excess)

    def _alive(self, n: int, now: float) -> bool:
        if n == self.node_id:
            return True
        p = self._peers.get(n)
        if p is None:
            # never heard since we started: presumed alive for a full failure timeout
            return now - self._judge_from <= self.timeout
        return (now - max(p.last_seen, self._judge_from) <= self.timeout
                and p.state != EXPELLED)

    @guarded
    async def _on_heartbeat(self, env: Envelope) -> None:
        b = env.body
        n = env.sender
        if n not in self.node_ids or n == self.node_id:
            return
        now = trio.current_time()
        info = PeerInfo(int(b["inc"]), str(b["st"]), int(b["gen"]), frozenset(b["m"]),
                        bool(b["q"]), now)
        old = self._peers.get(n)
        info.heard_since = (old.heard_since if old is not None and old.inc == info.inc
                            and now - old.last_seen <= self.timeout else now)
        if old is not None and old.inc != info.inc:
            log.info("node %d gen %d: node %d has a new incarnation %#x (was %#x)",
                     self.node_id, self.view.generation, n, info.inc, old.inc)
        self._peers[n] = info
        self._max_gen = max(self._max_gen, info.gen)
        if (self.state == MEMBER and self.view.quorate and self._removed.get(n) == info.inc
                and info.state != EXPELLED
                and now - self._expel_sent_at.get(n, -math.inf) >= self.interval):
            self._expel_sent_at[n] = now
            self.expelled_sent += 1
            log.warning("node %d gen %d: node %d (inc %#x) was removed from the cluster; "
                        "telling it it is expelled", self.node_id, self.view.generation, n,
                        info.inc)
            await self._send(n, MsgType.EXPELLED, {"gen": self.view.generation, "inc": info.inc})
        await self._resend_activation(n, info, now)
        if self._pending_fence:
            self._maybe_fence()

    async def _resend_activation(self, n: int, info: PeerInfo, now: float) -> None:
        """A member of our view (this very incarnation: it committed the view) still
        shows an older generation a heartbeat period after we installed it: every copy
        of the activation it was sent was lost (cut links). Send it again; without it,
        a member that is our coordinator would stay joining and nobody would propose."""
        if (self.state != MEMBER or self._incs.get(n) != info.inc or n == self.node_id
                or info.gen >= self.view.generation or self._view_body is None
                or now - self._installed_at < self.interval
                or now - self._activation_sent_at.get(n, -math.inf) < self.interval):
            return
        self._activation_sent_at[n] = now
        log.info("node %d gen %d: node %d has not installed our view; sending it again",
                 self.node_id, self.view.generation, n)
        await self._send(n, MsgType.VIEW_ACTIVATE, dict(self._view_body))
