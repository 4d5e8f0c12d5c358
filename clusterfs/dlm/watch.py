"""Suspicion from lock messages: an answer owed too long makes its node a suspect.

A node whose process is frozen (SIGSTOP, a VM pause) while its connections stay up
is found by membership's heartbeats only after the failure timeout. Its lock
traffic notices sooner: a request sent to it is not answered, a blocking callback
it was sent is not followed by a demote. So, as the proxy does for a silent block
server (../shared/seeds/000: "an i/o error generating an event into the CM to tell
it to take another look around quickly"), a lockspace that has waited
`answer_timeout` for a node tells membership to look at that node now
(`Membership.suspect(node, why)`): membership probes it with a short deadline,
and a node that does not answer is removed by the normal path (a new view, fencing,
recovery) well before the failure timeout.

What is watched (each entry keeps when it started waiting):

- owner side, `ls_waiting` (lock id -> since): a request, conversion or cancel sent
  to a remote master, until it is granted or failed. Whether the master answered
  "queued" or not at all, a lock not granted for `answer_timeout` counts: a frozen
  master neither answers nor grants;
- owner side, `ls_lookup_since` (resource key -> (directory node, since)): a lookup
  sent to a remote directory node, until its reply;
- master side, `ls_basts` (lock id -> (owner, since)): a blocking callback sent to a
  remote holder, until that holder converts, unlocks or cancels that lock (or the
  lock is gone): a frozen holder never demotes;
- `ls_query_since` (query id -> (master, since)): a DLM_QUERY (`dump_resource`: the
  queues of a resource, asked of its master), until its reply. Its caller waits for
  it, at most QUERY_TIMEOUT (lockspace.py), and a view without that master ends the
  wait (the query is asked again of the master after recovery);
- `ls_ask_since` (ask id -> (master, since)): a DLM_PREFER_ASK (routing.py: an owner
  asks a master to name its locks' servers again, after its proxy found a server
  silent or the live servers changed), until its DLM_PREFER. Nobody waits for it (the
  proxy routes around a silent server by itself), but while it is unanswered the
  owner's grants keep naming the server it asked to avoid, and the master of a lock
  already held is owed nothing else: this is how a frozen master of held locks is
  found. A view change ends it (routing.py asks again after the recovery);
- recovery barriers (barrier.py): members not heard from at a barrier.

An answer overdue is a reason to look, not a verdict. A node is suspected only if
it is also *silent*: membership has not heard it (not even a heartbeat) for
answer_timeout either (`Membership.silent_for`). A node that keeps a contended lock
for minutes, or a master whose queue does not move, but whose heartbeats arrive, is
alive - the probe would be answered by its next heartbeat - so it is not suspected
at all (counted in `stats["overdue"]`, once per entry), and a node that freezes in
the middle of such a wait is suspected answer_timeout after its last heartbeat. The
probe decides the rest: a node that answers it stays. So nothing here can remove a
node whose process keeps answering, however long it holds a lock; and load alone
(a busy node answering late) costs a probe only when its heartbeats are late too.

A node is handed to membership once per silence (again only if it was heard from
since, and then fell silent again); each suspicion is logged (info) with the
generation, what is owed and how long the node has been silent, and membership logs
the outcome (answered: it stays; not answered: it is removed).
Entries are judged only while locking runs; a recovery restarts every clock (a
master defers what arrives during recovery: no answer is owed meanwhile). Stale
entries (the lock granted, failed or gone, the lookup, query or ask over, the node
out of the view) are dropped when judged. Owns `ls_answer_timeout`, `ls_waiting`,
`ls_lookup_since`, `ls_basts`, `ls_query_since`, `ls_ask_since` and
`ls_suspected_at`. A mixin of `Lockspace`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from typing import Any

import trio

from clusterfs.dlm.lkb import Lkb

log = logging.getLogger("clusterfs.dlm")


class Watch:
    """Answers owed to this node, and suspicion of who owes them (mixin of Lockspace)."""

    ls_answer_timeout: float
    # lock id -> (since, overdue already counted)
    ls_waiting: dict[int, tuple[float, bool]]
    ls_lookup_since: dict[bytes, tuple[int, float, bool]]
    ls_basts: dict[int, tuple[int, float, bool]]
    ls_query_since: dict[int, tuple[int, float, bool]]
    ls_ask_since: dict[int, tuple[int, float, bool]]
    ls_suspected_at: dict[int, float]

    def _init_watch(self, answer_timeout: float | None) -> None:
        self.ls_answer_timeout = math.inf if answer_timeout is None else answer_timeout
        self.ls_waiting = {}
        self.ls_lookup_since = {}
        self.ls_basts = {}
        self.ls_query_since = {}
        self.ls_ask_since = {}
        self.ls_suspected_at = {}
        self.stats["suspected"] = 0      # nodes handed to membership to look at
        self.stats["overdue"] = 0        # answers overdue from nodes still heard from

    @property
    def _watching(self) -> bool:
        return self.ls_answer_timeout != math.inf

    # -- recording what is owed ----------------------------------------------------
    def _watch_waiting(self, lkb: Lkb) -> None:
        """lkb's request, conversion or cancel went to a remote master."""
        if self._watching:
            self.ls_waiting[lkb.lkb_id] = (trio.current_time(), False)

    def _unwatch_waiting(self, lkid: int) -> None:
        if self.ls_waiting:
            self.ls_waiting.pop(lkid, None)

    def _watch_lookup(self, key: bytes, dir_node: int) -> None:
        if self._watching and dir_node != self.ls_node:
            self.ls_lookup_since[key] = (dir_node, trio.current_time(), False)

    def _watch_bast(self, lkid: int, owner: int) -> None:
        """A blocking callback went to a remote holder; its clock starts with the first
        one (a holder that never answers is not excused by being asked again)."""
        if self._watching and owner != self.ls_node and lkid not in self.ls_basts:
            self.ls_basts[lkid] = (owner, trio.current_time(), False)

    def _bast_answered(self, lkid: int) -> None:
        """The holder converted, unlocked or cancelled the lock it was asked to demote."""
        if self.ls_basts:
            self.ls_basts.pop(lkid, None)

    def _watch_query(self, qid: int, master: int) -> None:
        """A DLM_QUERY went to a remote master; it ends with its reply (ls_queries)."""
        if self._watching and master != self.ls_node:
            self.ls_query_since[qid] = (master, trio.current_time(), False)

    def _watch_ask(self, aid: int, master: int) -> None:
        """A DLM_PREFER_ASK went to a remote master; it ends with its DLM_PREFER."""
        if self._watching and master != self.ls_node:
            self.ls_ask_since[aid] = (master, trio.current_time(), False)

    # -- judging -----------------------------------------------------------------
    async def _watch_loop(self) -> None:
        """Judge what is owed a few times per answer_timeout while locking runs."""
        if not self._watching:
            return
        tick = min(0.5, max(0.02, self.ls_answer_timeout / 4))
        recoveries = self.ls_recoveries
        while not self.ls_expelled:
            await trio.sleep(tick)
            if not self.ls_running:
                continue
            if recoveries != self.ls_recoveries:
                recoveries = self.ls_recoveries
                self._restart_clocks()
            self._judge(trio.current_time())

    def _restart_clocks(self) -> None:
        """Locking resumed after a recovery: nothing was owed while it was stopped."""
        now = trio.current_time()
        self.ls_waiting = {k: (now, seen) for k, (_, seen) in self.ls_waiting.items()}
        for owed in (self.ls_lookup_since, self.ls_basts, self.ls_query_since,
                     self.ls_ask_since):
            for k, (n, _, seen) in owed.items():
                owed[k] = (n, now, seen)

    def _judge(self, now: float) -> None:
        self._judge_waiting(now)
        self._judge_owed(self.ls_lookup_since, now, lambda key: key in self.ls_lookups,
                         lambda key, w: f"lookup of {key!r} not answered for {w:.1f} s "
                                        "by its directory node")
        self._judge_owed(self.ls_basts, now,
                         lambda lkid: self.ls_table.lock_info(lkid) is not None,
                         lambda lkid, w: f"holder of lock {lkid:#x} asked to demote "
                                         f"{w:.1f} s ago, has not")
        self._judge_owed(self.ls_query_since, now, lambda qid: qid in self.ls_queries,
                         lambda qid, w: f"query {qid:#x} of "
                                        f"{self.ls_queries[qid].key!r} not answered for "
                                        f"{w:.1f} s by its master")
        self._judge_owed(self.ls_ask_since, now, lambda aid: aid in self.ls_asks,
                         lambda aid, w: f"ask {aid:#x} to name servers again not "
                                        f"answered for {w:.1f} s by its master")

    def _judge_waiting(self, now: float) -> None:
        """Locks waiting on a remote master: its node is looked up anew each time (a
        lookup or a recovery may have moved the resource)."""
        t = self.ls_answer_timeout
        for lkid, (since, seen) in list(self.ls_waiting.items()):
            lkb = self.ls_lkbs.get(lkid)
            if lkb is None or lkb.lkb_done.is_set():
                del self.ls_waiting[lkid]
                continue
            master = self.ls_master_of.get(lkb.lkb_key)
            if now - since < t or master is None or master == self.ls_node \
                    or master not in self.ls_members:
                continue
            how = "queued there, not granted" if lkb.lkb_queued else "not answered"
            if not self._overdue(master, seen, f"lock {lkid:#x} on {lkb.lkb_key!r} waiting "
                                 f"{now - since:.1f} s for its master ({how})"):
                self.ls_waiting[lkid] = (since, True)

    def _judge_owed(self, owed: dict[Any, tuple[int, float, bool]], now: float,
                    pending: Callable[[Any], bool],
                    what: Callable[[Any, float], str]) -> None:
        """Judge entries (key -> (node, since, overdue counted)) of answers owed by one
        node each: dropped once answered (`pending` false) or the node is out of the
        view; after answer_timeout, its node suspected if silent too."""
        t = self.ls_answer_timeout
        for key, (node, since, seen) in list(owed.items()):
            if node not in self.ls_members or not pending(key):
                del owed[key]
                continue
            if now - since >= t and not self._overdue(node, seen, what(key, now - since)):
                owed[key] = (node, since, True)

    def _overdue(self, node: int, counted: bool, why: str) -> bool:
        """An answer `node` owes is overdue: suspect it if it is silent too (True);
        else count it once (`counted`: already) and keep waiting."""
        if self._suspect_node(node, why):
            return True
        if not counted:
            self.stats["overdue"] += 1
            log.debug("dlm %s@%d: %s, but node %d was heard %.2f s ago: alive",
                      self.ls_name, self.ls_node, why, node, self._silence(node))
        return False

    def _suspect_missing(self, nodes: Iterable[int], what: str, waited: float) -> None:
        """Recovery (barrier.py) waited `waited` seconds for `nodes`."""
        if waited >= self.ls_answer_timeout:
            for n in sorted(nodes):
                self._suspect_node(n, f"{what}: not heard for {waited:.1f} s")

    def _silence(self, node: int) -> float:
        silent_for = getattr(self.ls_dlm.membership, "silent_for", None)
        return math.inf if silent_for is None else silent_for(node)

    def _suspect_node(self, node: int, why: str) -> bool:
        """Tell membership to look at `node` now, if it has been silent for
        answer_timeout, once per silence (not again until it was heard from since).
        False if it is not silent."""
        silence = self._silence(node)
        if silence < self.ls_answer_timeout:
            return False
        now = trio.current_time()
        last = self.ls_suspected_at.get(node)
        if last is not None and now - silence <= last:
            return True        # not heard since we suspected it: membership is on it
        self.ls_suspected_at[node] = now
        self.stats["suspected"] += 1
        v = self.ls_view
        log.info("dlm %s@%d gen %d: %s, and node %d silent %.2f s; asking membership to "
                 "look at it", self.ls_name, self.ls_node, v.generation if v else 0, why,
                 node, self._silence(node))
        suspect = getattr(self.ls_dlm.membership, "suspect", None)
        if suspect is not None:
            suspect(node, f"dlm: {why}")
        return True
