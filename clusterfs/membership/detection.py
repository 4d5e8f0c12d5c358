"""Heartbeats and failure detection: who is alive, judged only over time in which
we could have heard them; telling a removed incarnation it was expelled; sending
a view again to a member that missed its activation (see service.py).

Suspicion (../shared/seeds/000: "an i/o error generating an event into the CM to
tell it to take another look around quickly"). A layer above that finds a member
silent - the proxy's I/O to a block server timed out, a lock message to it or a
blocking callback it was sent went unanswered while its heartbeats stopped too
(clusterfs/dlm/watch.py, which asks `silent_for(node)` first) - calls
`suspect(node, why)`. An answer overdue alone is a reason to look, not to probe:
with `quiet` (the proxy's: how long the server owed its I/O the answer) the node is
probed only if we have not heard it either, not even a heartbeat, for that long -
the rule clusterfs/dlm/watch.py applies to lock messages (quiet 0: the node refused,
or its connection broke; then a heartbeat interval). One heard more recently is
looked at again once it would have been silent that long and half a heartbeat
interval more (heartbeats come a little late at times): heard from meanwhile, it is
alive (slow, not stopped), left alone and counted (`suspicions_heard`, logged at
debug); still silent, it is probed then. A node stopped before the I/O it owes was
sent has been silent longer than the I/O waited, so it is probed at once, as
without `quiet`; only one whose last heartbeat came after the I/O was sent (sent
just before the stop) waits until it has been silent that long, and half an
interval. A quiet shorter than the heartbeat interval (the proxy's requests on an
event loop wait io_timeout / 4) spares a live node only when its last heartbeat was
that recent: such a node is probed as before, and answers.

A node suspected is probed at once (PROBE, answered at once with a heartbeat), and
every other member is told (SUSPECT) and probes it too, so that whichever member
coordinates judges it. A probed node not heard from within
`probe_timeout` of the probe (counted, like every silence, only over time in
which we could have heard it) is dead to us without waiting out the failure
timeout; any heartbeat after the probe clears the suspicion: a node that answers
stays, however long it keeps a lock (a probe asks whether its process answers, not
whether its locks are granted). Both outcomes are logged. An unanswered probe of
a node whose process still sends beacons (comms/beacon.py: a thread apart from its
event loop) saying its loop ran within the failure timeout is a stalled loop, not a
stopped node: it stays until it answers, its beacons stop, or its loop has not run
for the failure timeout (`_only_stalled`; the same holds for heartbeats missed for the
failure timeout while its loop stalls). Beacons excuse only a loop that stopped
about when the node fell silent: a node whose loop runs but that does not answer (the
network between us down, UDP through) is judged as before. Without beacons from it,
the price is the failure timeout's own: a member whose event loop does not answer
for probe_timeout is removed and fenced although alive.
"""

from __future__ import annotations

import math
from typing import Any

import trio

from clusterfs.comms.interface import Envelope
from clusterfs.membership.installation import ViewInstallation
from clusterfs.membership.state import EXPELLED, MEMBER, PeerInfo, guarded, log
from clusterfs.wire.types import MsgType

# how far a node's loop may have run past the moment we began waiting on it and its
# stall still explain the silence: the beacon's loop tick (0.1 s) and its delivery
STALL_SLACK = 0.25
# a loop that has just run again after a stall gets this long to answer (its backlog)
STALL_GRACE = 0.5


class FailureDetection(ViewInstallation):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # self.probe_timeout: state.py ([timeouts] probe_timeout, or its default)
        self._probed: dict[int, float] = {}      # node -> when we probed it
        self._unanswered_probes: set[int] = set()   # said so in the log
        self.probes = 0
        self.probes_answered = 0
        self.probes_unanswered = 0
        self.suspicions_heard = 0     # heard from within their quiet: not probed
        self.probes_spared = 0        # unanswered, but the beacon said: only stalled
        self._stalled_spared: set[int] = set()   # said so in the log, this probe
        self._quiet_checks: set[int] = set()     # nodes looked at again after a while
        self._look_again = False      # a member refused while a round was running
        self.endpoint.register([MsgType.SUSPECT], self._on_suspect)
        self.endpoint.register([MsgType.PROBE], self._on_probe)
        self.endpoint.on_refused(self._on_refused)

    # -- a refused reconnect ---------------------------------------------------------
    def _on_refused(self, node: int) -> None:
        """`node`'s host refused our connection: its process is gone (_refused_since).
        Judge now rather than at the next round, up to a heartbeat interval later: the
        coordinator proposes the view without it at once (it is still fenced before
        any recovery). Never waits; the transport calls it in the trio thread."""
        if (self.state != MEMBER or self._nursery is None or node == self.node_id
                or node not in self.view.members):
            return
        if self._round_running:
            self._look_again = True        # the round's end looks (proposals.py)
            return
        self._evaluate()                   # proposals.py

    def _evaluate_if_asked(self) -> None:
        """A round just ended: look again at once if a member refused during it."""
        if self._look_again:
            self._look_again = False
            self._evaluate()

    # -- suspicion ---------------------------------------------------------------------
    def suspect(self, node: int, why: str = "", *, quiet: float | None = None) -> None:
        """`node` did not answer us (see the module doc; `why`: what it did not answer,
        for the log): probe it now and have the other members probe it; with `quiet`
        (how long it owed the answer), only once we have not heard it for that long
        either (quiet 0: for a heartbeat interval). Never waits; call from the trio
        thread."""
        if not self._may_suspect(node):
            return
        if quiet is not None:
            need = quiet or self.interval
            if self.silent_for(node) < need:
                self._suspect_when_silent(node, why, need)
                return
        log.info("node %d gen %d: node %d is suspected silent%s; probing it and telling "
                 "the members", self.node_id, self.view.generation, node,
                 f" ({why})" if why else "")
        self._probe(node)
        assert self._nursery is not None
        body = {"node": node, "gen": self.view.generation}
        for n in sorted(self.view.members - {self.node_id, node}):
            self._nursery.start_soon(self._send, n, MsgType.SUSPECT, body)

    def _may_suspect(self, node: int) -> bool:
        return (self.state == MEMBER and self._nursery is not None
                and node != self.node_id and node in self.view.members)

    def _suspect_when_silent(self, node: int, why: str, need: float) -> None:
        """`node` was heard within `need` s: look again once it would have been silent
        that long (one such look per node at a time)."""
        assert self._nursery is not None
        if node not in self._quiet_checks:
            self._quiet_checks.add(node)
            self._nursery.start_soon(self._look_when_silent, node, why, need)

    async def _look_when_silent(self, node: int, why: str, need: float) -> None:
        """Probe `node` unless it is heard from before it has been silent `need` s, and
        half a heartbeat interval more: a live node's next heartbeat is due by then, a
        little late at times, never early."""
        heard = self._peers.get(node)      # every heartbeat, a probe's answer too, is new
        try:
            await trio.sleep(need - self.silent_for(node) + self.interval / 2)
        finally:
            self._quiet_checks.discard(node)
        if self._peers.get(node) is not heard:
            self.suspicions_heard += 1
            log.debug("node %d gen %d: node %d owed an answer (%s) but was heard within "
                      "%.2f s: alive, not probed", self.node_id, self.view.generation,
                      node, why, need)
            return
        self.suspect(node, f"{why}; silent {self.silent_for(node):.2f} s")

    def silent_for(self, node: int) -> float:
        """Seconds since we last heard `node` (a heartbeat, or a probe's answer), not
        counting our own stalls; inf if we have not heard it since we started. A layer
        above asks before it suspects a node that owes it an answer: one heard from
        since is alive (a probe would be answered by its next heartbeat anyway)."""
        p = self._peers.get(node)
        if p is None or self._nursery is None:
            return math.inf
        return max(0.0, trio.current_time() - max(p.last_seen, self._judge_from))

    def _probe(self, node: int) -> None:
        assert self._nursery is not None
        now = trio.current_time()
        if now - self._probed.get(node, -math.inf) < self.probe_timeout:
            return                                # a probe of it is under way
        self._probed[node] = now
        self.probes += 1
        self._nursery.start_soon(self._send, node, MsgType.PROBE, {"inc": self.incarnation})
        self._nursery.start_soon(self._judge_probe)

    async def _judge_probe(self) -> None:
        """Look again right after the probe's time is up, not at the next round."""
        await trio.sleep(self.probe_timeout + 0.01)
        if not self._round_running:
            self._evaluate()                      # proposals.py

    def _probe_unanswered(self, n: int, last_seen: float, now: float) -> bool:
        probed = self._probed.get(n)
        if probed is None:
            return False
        if last_seen >= probed:
            del self._probed[n]                   # heard since: not silent after all
            self._unanswered_probes.discard(n)
            self._stalled_spared.discard(n)
            self.probes_answered += 1
            log.info("node %d gen %d: node %d answered our probe after %.3f s: alive "
                     "(only slow), it stays", self.node_id, self.view.generation, n,
                     last_seen - probed)
            return False
        if now - max(probed, self._judge_from) <= self.probe_timeout:
            return False
        if self._only_stalled(n, now - probed, STALL_SLACK):
            return False
        if n not in self._unanswered_probes:
            self._unanswered_probes.add(n)
            self.probes_unanswered += 1
            log.warning("node %d gen %d: node %d did not answer our probe within %.2f s: "
                        "taken for dead", self.node_id, self.view.generation, n,
                        self.probe_timeout)
        return True

    def _only_stalled(self, n: int, waited: float, slack: float) -> bool:
        """n's beacons (comms/beacon.py: a thread apart from its event loop; fresh, of
        the member's incarnation) say its loop stopped about when we began waiting on
        it (`waited` s ago, less `slack`) and has been stopped since, for less than the
        failure timeout - or was until a moment ago (STALL_GRACE: its answer is on its
        way): a loop stalled by a long collection or a CPU shortage explains the
        silence, which is then no evidence of death. A loop that ran meanwhile explains
        nothing (a node that runs but that we cannot reach), nor do beacons that
        stopped (frozen, dead, cut off). Said once per silence."""
        p = self._peers.get(n)
        seen = self.liveness.ages(n) if self.liveness is not None else None
        if p is None or seen is None or seen.incarnation != p.inc \
                or seen.heard > self.probe_timeout:
            return False
        if waited - slack <= seen.loop <= self.timeout:
            stalled_for = seen.loop                                   # still stalled
        elif (seen.stall_began is not None and seen.stall_ended <= STALL_GRACE
              and seen.stall_began >= waited - slack
              and seen.stall_began - seen.stall_ended <= self.timeout):
            stalled_for = seen.stall_began - seen.stall_ended         # just resumed
        else:
            return False
        if n not in self._stalled_spared:
            self._stalled_spared.add(n)
            self.probes_spared += 1
            log.info("node %d gen %d: node %d has not answered for %.2f s, but its process "
                     "runs (beacon) and its event loop stalled %.2f s: only stalled, it "
                     "stays while its loop runs within the failure timeout (%.1f s)",
                     self.node_id, self.view.generation, n, waited, stalled_for,
                     self.timeout)
        return True

    @guarded
    async def _on_suspect(self, env: Envelope) -> None:
        node = int(env.body["node"])
        if (self.state == MEMBER and env.sender in self.view.members
                and node in self.view.members and node != self.node_id):
            log.info("node %d gen %d: node %d suspects node %d; probing it", self.node_id,
                     self.view.generation, env.sender, node)
            self._probe(node)

    @guarded
    async def _on_probe(self, env: Envelope) -> None:
        if env.sender in self.node_ids and env.sender != self.node_id:
            await self._send(env.sender, MsgType.HEARTBEAT, self._heartbeat_body())

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
        if self._refused_since(n, p.last_seen):
            return False
        # silent for the failure timeout: dead, unless its loop stalled about when it
        # fell silent (its last heartbeat may have gone up to an interval before)
        silent = now - max(p.last_seen, self._judge_from)
        return ((silent <= self.timeout
                 or self._only_stalled(n, now - p.last_seen, self.interval + STALL_SLACK))
                and p.state != EXPELLED and not self._probe_unanswered(n, p.last_seen, now))

    def _refused_since(self, n: int, heard: float) -> bool:
        """n's host refused a connection to it after we last heard it: its process is
        gone (killed, crashed), whatever the failure timeout says. Only a refusal counts,
        the one answer a live process never gives; silence (a frozen node, a cut, a host
        powered off) is still judged by the timeout. A heartbeat after the refusal (a
        restarted node) makes it alive again."""
        refused = self.endpoint.refused_at(n)
        return refused is not None and refused > heard

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
        self._stalled_spared.discard(n)       # heard: a later silence is said again
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
