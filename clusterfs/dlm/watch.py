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
  "queued" or not at all, a lock not granted after `answer_timeout` makes its
  master a suspect: a frozen master neither answers nor grants, and a master that
  is alive answers the probe;
- owner side, `ls_lookup_since` (resource key -> (directory node, since)): a lookup
  sent to a remote directory node, until its reply;
- master side, `ls_basts` (lock id -> (owner, since)): a blocking callback sent to a
  remote holder, until that holder converts, unlocks or cancels that lock (or the
  lock is gone): a frozen holder never demotes;
- recovery barriers (barrier.py): members not heard from at a barrier.

A suspicion is only a question. Membership asks whether the node's *process*
answers, not whether its locks are granted: a node that holds a contended lock for
a long time and answers the probe stays, however long it holds it. So an entry
still waiting after a suspicion is suspected again, but with growing pauses
(answer_timeout, then twice that, up to BACKOFF_MAX times it), so a long legitimate
hold costs a few probes, and a node that freezes in the middle of one is still
found within a few answer_timeouts plus the probe. At most one suspicion per node
per answer_timeout goes to membership, and each is logged (info) with the
generation; membership logs the outcome.

Entries are judged only while locking runs; a recovery restarts every clock (a
master defers what arrives during recovery: no answer is owed meanwhile). Stale
entries (the lock granted, failed or gone, the node out of the view) are dropped
when judged. Owns `ls_answer_timeout`, `ls_waiting`, `ls_lookup_since`,
`ls_basts` and `ls_suspected_at`. A mixin of `Lockspace`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable

import trio

from clusterfs.dlm.lkb import Lkb

log = logging.getLogger("clusterfs.dlm")

BACKOFF_MAX = 8          # an entry is suspected again after at most this many timeouts


class Watch:
    """Answers owed to this node, and suspicion of who owes them (mixin of Lockspace)."""

    ls_answer_timeout: float
    # lock id -> (since, pause before the next suspicion)
    ls_waiting: dict[int, tuple[float, float]]
    ls_lookup_since: dict[bytes, tuple[int, float, float]]
    ls_basts: dict[int, tuple[int, float, float]]
    ls_suspected_at: dict[int, float]

    def _init_watch(self, answer_timeout: float | None) -> None:
        self.ls_answer_timeout = math.inf if answer_timeout is None else answer_timeout
        self.ls_waiting = {}
        self.ls_lookup_since = {}
        self.ls_basts = {}
        self.ls_suspected_at = {}
        self.stats["suspected"] = 0

    @property
    def _watching(self) -> bool:
        return self.ls_answer_timeout != math.inf

    # -- recording what is owed ----------------------------------------------------
    def _watch_waiting(self, lkb: Lkb) -> None:
        """lkb's request, conversion or cancel went to a remote master."""
        if self._watching:
            self.ls_waiting[lkb.lkb_id] = (trio.current_time(), self.ls_answer_timeout)

    def _unwatch_waiting(self, lkid: int) -> None:
        if self.ls_waiting:
            self.ls_waiting.pop(lkid, None)

    def _watch_lookup(self, key: bytes, dir_node: int) -> None:
        if self._watching and dir_node != self.ls_node:
            self.ls_lookup_since[key] = (dir_node, trio.current_time(), self.ls_answer_timeout)

    def _watch_bast(self, lkid: int, owner: int) -> None:
        """A blocking callback went to a remote holder; its clock starts with the first
        one (a holder that never answers is not excused by being asked again)."""
        if self._watching and owner != self.ls_node and lkid not in self.ls_basts:
            self.ls_basts[lkid] = (owner, trio.current_time(), self.ls_answer_timeout)

    def _bast_answered(self, lkid: int) -> None:
        """The holder converted, unlocked or cancelled the lock it was asked to demote."""
        if self.ls_basts:
            self.ls_basts.pop(lkid, None)

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
        now, t = trio.current_time(), self.ls_answer_timeout
        self.ls_waiting = dict.fromkeys(self.ls_waiting, (now, t))
        self.ls_lookup_since = {k: (n, now, t) for k, (n, _, _) in self.ls_lookup_since.items()}
        self.ls_basts = {lkid: (n, now, t) for lkid, (n, _, _) in self.ls_basts.items()}

    def _next_pause(self, pause: float) -> float:
        return min(2 * pause, BACKOFF_MAX * self.ls_answer_timeout)

    def _judge(self, now: float) -> None:
        for lkid, (since, pause) in list(self.ls_waiting.items()):
            lkb = self.ls_lkbs.get(lkid)
            if lkb is None or lkb.lkb_done.is_set():
                del self.ls_waiting[lkid]
                continue
            master = self.ls_master_of.get(lkb.lkb_key)
            if now - since < pause or master is None or master == self.ls_node \
                    or master not in self.ls_members:
                continue
            self.ls_waiting[lkid] = (now, self._next_pause(pause))
            how = ("queued there, not granted" if lkb.lkb_queued else "not answered")
            self._suspect_node(master, f"lock {lkid:#x} on {lkb.lkb_key!r} waiting "
                               f"{now - since:.1f} s for its master ({how})")
        for key, (node, since, pause) in list(self.ls_lookup_since.items()):
            if key not in self.ls_lookups or node not in self.ls_members:
                del self.ls_lookup_since[key]
                continue
            if now - since >= pause:
                self.ls_lookup_since[key] = (node, now, self._next_pause(pause))
                self._suspect_node(node, f"lookup of {key!r} not answered for "
                                   f"{now - since:.1f} s by its directory node")
        for lkid, (owner, since, pause) in list(self.ls_basts.items()):
            if owner not in self.ls_members or self.ls_table.lock_info(lkid) is None:
                del self.ls_basts[lkid]
                continue
            if now - since >= pause:
                self.ls_basts[lkid] = (owner, now, self._next_pause(pause))
                self._suspect_node(owner, f"holder of lock {lkid:#x} asked to demote "
                                   f"{now - since:.1f} s ago, has not")

    def _suspect_missing(self, nodes: Iterable[int], what: str, waited: float) -> None:
        """Recovery (barrier.py) waited `waited` seconds for `nodes`."""
        if waited >= self.ls_answer_timeout:
            for n in sorted(nodes):
                self._suspect_node(n, f"{what}: not heard for {waited:.1f} s")

    def _suspect_node(self, node: int, why: str) -> None:
        """Tell membership to look at `node` now (at most once per answer_timeout)."""
        now = trio.current_time()
        if now - self.ls_suspected_at.get(node, -math.inf) < self.ls_answer_timeout:
            return
        self.ls_suspected_at[node] = now
        self.stats["suspected"] += 1
        v = self.ls_view
        log.info("dlm %s@%d gen %d: %s; asking membership to look at node %d",
                 self.ls_name, self.ls_node, v.generation if v else 0, why, node)
        suspect = getattr(self.ls_dlm.membership, "suspect", None)
        if suspect is not None:
            suspect(node, f"dlm: {why}")
