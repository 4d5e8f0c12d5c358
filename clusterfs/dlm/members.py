"""The lockspace's members: what it does when membership changes.

Membership's ordered event stream drives it (Linux's member.c): a new view
stops locking at once (`_stop`, recovery step 0) and starts a recovery for
that view, cancelling one still running for an older view; a Fenced event
lets a waiting recovery go on (step 1 waits for it); an ExpelledEvent
withdraws the lockspace, failing every waiting request.

Owns `ls_view`, `ls_members`, `ls_gone` (removed members whose locks are still
to purge), `ls_need_fence`, `ls_resync` (members that joined since the last
recovery finished here), `ls_running` / `ls_run_event`, `ls_expelled` and the
running recovery's cancel scope. A mixin of `Lockspace`.
"""

from __future__ import annotations

import logging

import trio

from clusterfs.dlm.lkb import Status
from clusterfs.errors import Expelled
from clusterfs.membership.view import ExpelledEvent, Fenced, Membership, View, ViewChange

log = logging.getLogger("clusterfs.dlm")


class Members:
    """Following the membership events (a mixin of Lockspace)."""

    async def _event_loop(self, membership: Membership, nursery: trio.Nursery) -> None:
        async for ev in membership.subscribe():
            if isinstance(ev, ViewChange):
                self._on_view_change(ev, nursery)
            elif isinstance(ev, Fenced):
                self._on_fenced(ev)
            elif isinstance(ev, ExpelledEvent):
                self._expel(ev.generation)

    def _on_view_change(self, ev: ViewChange, nursery: trio.Nursery) -> None:
        """Stop locking, abort a recovery for an older view, recover for this one.
        (Cancelled before _stop wakes it: a waiting step then ends Cancelled.)"""
        if self._recover_scope is not None:
            self._recover_scope.cancel()
        self._stop(ev.view, ev.left, ev.clean, ev.joined)
        if self.ls_node not in ev.view.members:
            return   # joining: wait for a view that holds us
        self._recover_scope = trio.CancelScope()
        nursery.start_soon(self._run_recovery, ev.view, self._recover_scope)

    def _on_fenced(self, ev: Fenced) -> None:
        log.info("dlm %s gen %d: fenced %s", self.ls_name, ev.generation, sorted(ev.nodes))
        self.ls_need_fence -= ev.nodes
        self._wake()   # recovery step 1 may go on

    def _stop(self, view: View, left: frozenset[int],
              clean: frozenset[int] = frozenset(),
              joined: frozenset[int] = frozenset()) -> None:
        """Step 0 (at once, on the event): stop locking; requests wait. A node that left
        cleanly released every lock first and writes no more: no fence to wait for. A
        node that joined may bring lock state that messages lost while it was away left
        out of step: recovery resynchronises our locks with it (ls_resync, recovery.py)."""
        log.info("dlm %s@%d gen %d: stop locking (members %s, left %s, cleanly %s, "
                 "quorate %s)", self.ls_name, self.ls_node, view.generation,
                 sorted(view.members), sorted(left), sorted(clean), view.quorate)
        self.ls_view = view
        self.ls_members = view.members
        self.ls_gone |= set(left)
        self.ls_gone -= view.members
        self.ls_need_fence |= set(left - clean)
        self.ls_need_fence -= view.members
        self.ls_resync |= joined
        if self.ls_running:
            self.ls_running = False
            self.ls_run_event = trio.Event()
        for ev in list(self.ls_lookups.values()):
            ev.set()     # normal lookups start over after recovery
        self.ls_lookups.clear()
        self._end_queries()        # lockspace.py: asked again of the new master
        self._end_asks()           # routing.py: asked again after the recovery
        self._wake()

    def _expel(self, generation: int) -> None:
        log.warning("dlm %s gen %d: this node was expelled; lockspace withdrawn",
                    self.ls_name, generation)
        self.ls_expelled = True
        self.ls_running = False
        if self._recover_scope is not None:
            self._recover_scope.cancel()
        for lkb in list(self.ls_lkbs.values()):
            if lkb.lkb_status != Status.GRANTED and not lkb.lkb_done.is_set():
                self._fail(lkb, Expelled("this node was expelled"))
        self._end_queries(every=True)
        self.ls_run_event.set()
