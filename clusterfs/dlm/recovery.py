"""Lockspace recovery: rebuild the lock state for a new view (Linux's ls_recover).

`_recover` is one straight list of logged steps, run on every member for every
view (members.py starts it): wait for fencing, wait for quorum, barrier, purge
the dead nodes' locks, rebuild the directory, choose new masters and re-send
the locks they must hold, settle the lock value blocks, resume. A newer view
cancels it (trio cancellation at any await) and a fresh run starts from step 1;
every step is idempotent or undone by step 4 of the next run.

Resynchronisation. A node that joins may be one the membership merges back: it
went on in a view without quorum while the others kept theirs (a SIGSTOP, a
network cut), and no view without quorum purges or fences, so its locks are
still counted. But messages between the two sides were lost meanwhile: each
side drops what a node outside its view sends (lockspace.py), sends no unlock or
down-conversion to a master outside it (owner.py), and a broken connection drops
what was queued on it. An unlock lost that way held the lock forever (a journal
recovery waiting for `("recovery",)` never ended), a lost grant left its
requester waiting. So for every pair of members of which one joined, the owner
re-sends its locks to the master as they are now (asked for in the step-1 status,
barrier.py): the master purges the owner's locks at step 4 and the messages it
deferred from it (older than what the re-send says), and the owner treats those
locks as orphans at step 6, found again through the rebuilt directory. A brand
new node has nothing to re-send, so a plain join costs nothing.

Owns `ls_recover_gen` (the generation being recovered: messages of an
overtaken recovery are dropped by it), `ls_recover_lvbs`, `ls_recover_kept`,
`ls_resync_with`, `ls_unconfirmed`, `ls_orphan_ops` and `ls_recoveries`, and the
two recovery messages that carry state: DLM_RECOVER_NAMES (a master to a
directory node) and DLM_RECOVER_LOCKS (an owner to a master). The barriers
between steps are barrier.py's. A mixin of `Lockspace`.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import Any

import trio

from clusterfs.dlm.interface import LVB_SIZE, Mode
from clusterfs.dlm.lkb import Lkb, Status, lkid_owner
from clusterfs.errors import LockCancelled, LockError
from clusterfs.membership.view import View
from clusterfs.wire.types import MsgType

log = logging.getLogger("clusterfs.dlm")


class Recovery:
    """The recovery steps and their messages (a mixin of Lockspace)."""

    async def _run_recovery(self, view: View, scope: trio.CancelScope) -> None:
        with scope:
            try:
                await self._recover(view)
            except trio.Cancelled:
                log.info("dlm %s gen %d: recovery aborted by a newer view",
                         self.ls_name, view.generation)
                raise

    def _rlog(self, g: int, step: str, *args: Any) -> None:
        log.info("dlm %s@%d gen %d: recover: %s", self.ls_name, self.ls_node, g,
                 step % args if args else step)

    async def _recover(self, view: View) -> None:
        """ls_recover: rebuild the lock state for a new view, step by step."""
        g = view.generation
        self._recover_begin(view)

        # 1. Wait until every removed node is reported fenced: its locks may
        #    only be dropped once it can no longer touch the disk.
        self._rlog(g, "1 wait for fencing of %s", sorted(self.ls_need_fence))
        while self.ls_need_fence:
            await self.ls_wake.wait()

        # 2. Without quorum nothing moves: requests wait (a new view restarts us).
        if not view.quorate:
            self._rlog(g, "2 no quorum: waiting for a quorate view")
            await trio.sleep_forever()

        # 3. Barrier: every member has stopped locking. Per-pair FIFO means all
        #    a member sent before stopping has been handled here by now.
        self._rlog(g, "3 barrier: all members stopped")
        await self._barrier(g, 1)

        # 4. Forget the dead: purge their locks and the masters that are gone;
        #    forget what must be resynchronised with nodes that joined.
        self._purge_dead(view)
        self._prepare_resync(view)

        # 5. Rebuild the directory over the members; once every member's names
        #    are in, answer the recovery lookups that waited for them.
        self._send_names(g)
        await self._barrier(g, 2)
        self._directory_ready(g)

        # 6. New masters for resources whose master died; owners re-send their
        #    locks there.
        await self._recover_masters(view)
        await self._barrier(g, 3)

        # 7. Finish rebuilt resources: their LVBs, then grant what can be.
        self._rebuild_resources(g)
        await self._barrier(g, 4)

        # 8. Resume locking: deferred messages, waiting requests, grants. (A newer
        #    view may have come while we were woken from barrier 4: it stopped
        #    locking and cancelled us; do not resume under it.)
        await trio.lowlevel.checkpoint_if_cancelled()
        self._resume(g)

    def _recover_begin(self, view: View) -> None:
        g = view.generation
        self.ls_recover_gen = g
        self.ls_recover_lvbs = {}
        self.ls_recover_kept = {}
        self.ls_rec_lookups = []
        self.ls_resync_with = self._resync_partners(view)
        if self.ls_resync_with:
            self._rlog(g, "0 resynchronising our locks with %s (joined since our last "
                       "recovery: %s)", sorted(self.ls_resync_with), sorted(self.ls_resync))
        # The directory is rebuilt from scratch (step 5). Clear it now, before
        # the first barrier: a faster member may send us its names right after it.
        self.ls_dir.clear()

    def _purge_dead(self, view: View) -> None:
        """Step 4: purge the removed nodes' locks from our master table (marking
        the LVBs they may have written invalid) and cached masters that are
        gone. Masters chosen by an aborted recovery stay masters (some members
        may have finished that recovery and rely on it), but our locks on those
        resources are re-sent (step 6): the aborted run may not have delivered
        them all. Duplicates are skipped."""
        # Only nodes this view removed and that are fenced: a newer view adds to
        # ls_gone and ls_need_fence before it cancels us, and a node it removed may
        # be alive (slow, or on the other side without quorum) and come back.
        dead = sorted(n for n in self.ls_gone
                      if n not in view.members and n not in self.ls_need_fence)
        purged = sum(self.ls_table.purge_node(n) for n in dead)
        self._forget_keys_of(dead)
        for key in self.ls_unconfirmed:
            self.ls_master_of.pop(key, None)
        self.ls_unconfirmed.clear()
        for key, master in list(self.ls_master_of.items()):
            if master not in view.members:
                del self.ls_master_of[key]
        self._rlog(view.generation, "4 purged %d locks of %s", purged, dead)

    def _resync_partners(self, view: View) -> frozenset[int]:
        """The members whose locks and ours must be resynchronised in this recovery:
        those that joined since our last finished recovery, or every member if we
        joined ourselves. ls_resync keeps what an overtaken recovery did not finish;
        resynchronising a pair twice is harmless (the owner's copy is the truth)."""
        others = view.members - {self.ls_node}
        if self.ls_node in self.ls_resync:
            return others
        return others & self.ls_resync

    def _prepare_resync(self, view: View) -> None:
        """Step 4, for the pairs to resynchronise. As master: drop the locks of every
        member that asked (barrier 1 brought its status, so its request is in) and what
        was deferred from it, all older than the locks it re-sends at step 6. As owner:
        forget the masters we resynchronise with, so our locks there become orphans that
        step 6 re-sends."""
        g = view.generation
        owners = sorted(self.ls_resync_from.get(g, set()) & view.members)
        purged = sum(self.ls_table.purge_node(n) for n in owners)
        self._forget_keys_of(owners)
        deferred = len(self.ls_deferred)
        self.ls_deferred = [m for m in self.ls_deferred if m[0] not in owners]
        for key, master in list(self.ls_master_of.items()):
            if master in self.ls_resync_with:
                del self.ls_master_of[key]
        if owners or self.ls_resync_with:
            self._rlog(g, "4 resync: dropped %d locks and %d deferred messages of %s, "
                       "re-sending ours to %s", purged, deferred - len(self.ls_deferred),
                       owners, sorted(self.ls_resync_with))

    def _send_names(self, g: int) -> None:
        """Step 5: every master tells each key's new directory node that it
        masters it (DLM_RECOVER_NAMES)."""
        by_dir: dict[int, list[bytes]] = {}
        for key in self.ls_mastered:
            by_dir.setdefault(self._dir_node(key), []).append(key)
        for dir_node, keys in by_dir.items():
            if dir_node == self.ls_node:
                self._record_names(self.ls_node, keys, g)
            else:
                self._send(dir_node, MsgType.DLM_RECOVER_NAMES, {"g": g, "names": keys})
        self._rlog(g, "5 directory: sent %d names", len(self.ls_mastered))

    def _directory_ready(self, g: int) -> None:
        """After barrier 2 every member's names are in: answer lookups."""
        self.ls_dir_ready = g
        pending, self.ls_rec_lookups = self.ls_rec_lookups, []
        for sender, body in pending:
            self._receive_lookup(sender, body)

    async def _recover_masters(self, view: View) -> None:
        """Step 6: the first survivor to ask the directory becomes master; every
        owner re-sends its granted, converting and waiting locks there
        (DLM_RECOVER_LOCKS), then the unlocks and down-conversions it made
        while the master was unknown."""
        g = view.generation
        orphans = self._orphaned_lkbs()
        op_keys = {key for key, _, _ in self.ls_orphan_ops} - set(orphans)
        async with trio.open_nursery() as nursery:
            for key in orphans:
                nursery.start_soon(partial(self._find_master, key, recovery=True))
            for key in op_keys:
                nursery.start_soon(partial(self._find_master, key, recovery=True,
                                           assign=False))
        # Lookups answered before a newer view came end without a checkpoint, and
        # so may the nursery: re-send nothing for an overtaken view.
        await trio.lowlevel.checkpoint_if_cancelled()
        for key, lkbs in orphans.items():
            self._resend_locks(g, key, lkbs)
        ops = self._replay_orphan_ops(view)
        self._rlog(g, "6 new masters for %d resources, %d locks re-sent, %d orphan ops",
                   len(orphans), sum(len(v) for v in orphans.values()), ops)

    def _orphaned_lkbs(self) -> dict[bytes, list[Lkb]]:
        """Our locks to re-send, by resource: those whose master is unknown (it
        died, or an aborted recovery chose it)."""
        orphans: dict[bytes, list[Lkb]] = {}
        for lkb in list(self.ls_lkbs.values()):
            if lkb.lkb_key in self.ls_master_of:
                continue
            if lkb.lkb_cancelling or (lkb.lkb_abandoned and lkb.lkb_status == Status.WAITING):
                # a cancel that its dead master never answered: it is cancelled
                self._fail(lkb, LockCancelled(f"{lkb.lkb_lock.name} cancelled"))
                continue
            if lkb.lkb_status == Status.WAITING and not lkb.lkb_sent:
                continue   # not sent yet: it goes the normal way after recovery
            orphans.setdefault(lkb.lkb_key, []).append(lkb)
        return orphans

    def _resend_locks(self, g: int, key: bytes, lkbs: list[Lkb]) -> None:
        entries = [self._recover_entry(lkb) for lkb in lkbs]
        master = self.ls_master_of[key]
        body = {"g": g, "name": key, "locks": entries}
        if master == self.ls_node:
            self._receive_recover_locks(self.ls_node, body)
        else:
            self._send(master, MsgType.DLM_RECOVER_LOCKS, body)

    def _replay_orphan_ops(self, view: View) -> int:
        """Send the unlocks and down-conversions made while the master was
        unknown (owner.py keeps them) to the master found since."""
        ops, self.ls_orphan_ops = self.ls_orphan_ops, []
        for key, mtype, body in ops:
            master = self.ls_master_of.get(key)
            if master is not None and master in view.members:
                self._send_or_local(master, mtype, body)
        return len(ops)

    def _rebuild_resources(self, g: int) -> None:
        """Step 7: a rebuilt resource's LVB is the newest copy a survivor holds,
        valid only if a survivor holds more than CR (a dead PW/EX holder may
        have changed it otherwise). Then grant what can be."""
        for key, copies in self.ls_recover_lvbs.items():
            best = max(copies, key=lambda c: c[1])
            valid = any(gr > Mode.CR for gr, _, _ in copies if gr >= 0)
            self.ls_table.set_resource_lvb(key, best[2], best[1], valid)
        for key in self.ls_mastered:
            self.ls_table.regrant(key)
        self._rlog(g, "7 rebuilt %d resources", len(self.ls_recover_lvbs))

    def _resume(self, g: int) -> None:
        """Step 8: locking runs again; handle what was deferred meanwhile."""
        self.ls_unconfirmed.clear()
        self.ls_gone.clear()
        self.ls_resync.clear()
        self.ls_recoveries += 1
        self.ls_running = True
        self.ls_run_event.set()
        deferred, self.ls_deferred = self.ls_deferred, []
        self._flush_table_events()
        for sender, mtype, body in deferred:
            self._dispatch(sender, mtype, body)
        self._reprefer_after_recovery()
        self._rlog(g, "8 done: locking resumed (%d deferred messages)", len(deferred))

    # -- recovery messages -------------------------------------------------------
    def _recover_entry(self, lkb: Lkb) -> list[Any]:
        """One lock as DLM_RECOVER_LOCKS carries it to its new master."""
        lock = lkb.lkb_lock
        gr = -1 if lkb.lkb_grmode is None else int(lkb.lkb_grmode)
        rq = -1 if lkb.lkb_rqmode is None else int(lkb.lkb_rqmode)
        if lkb.lkb_status == Status.GRANTED:
            rq = -1
        return [lkb.lkb_id, gr, rq, lock.range[0], lock.range[1],
                bytes(lock.lvb[:LVB_SIZE]).ljust(LVB_SIZE, b"\0"), lkb.lkb_lvbseq]

    def _receive_recover_names(self, sender: int, body: dict[str, Any]) -> None:
        if body["g"] != self.ls_recover_gen:
            return
        self._record_names(sender, body["names"], body["g"])

    def _record_names(self, master: int, keys: list[bytes], g: int) -> None:
        """Step 5 at a directory node: `master` masters `keys`. The directory was
        cleared at step 0 and answers no lookup before barrier 2, so an entry found
        here is another member's claim to the same resource: two masters, each
        granting its own locks. That is a bug of ours; say so where it shows."""
        for key in keys:
            other = self.ls_dir.get(key)
            if other is not None and other != master:
                log.error("dlm %s gen %d: %r is mastered by both node %d and node %d",
                          self.ls_name, g, key, other, master)
            self.ls_dir[key] = master

    def _receive_recover_locks(self, sender: int, body: dict[str, Any]) -> None:
        if body["g"] != self.ls_recover_gen:
            return     # from a recovery that was overtaken
        key = body["name"]
        if key not in self.ls_recover_lvbs and key in self.ls_mastered:
            self._keep_lvb(key)
        self.ls_mastered.add(key)
        copies = self.ls_recover_lvbs.setdefault(key, [])
        for lkid, gr, rq, rs, re_, lvb, seq in body["locks"]:
            if self.ls_table.lock_info(lkid) is None:
                # (present already: re-sent after an aborted recovery; keep ours,
                # it may have moved on since - e.g. been granted)
                try:
                    self.ls_table.recover_lock(key, lkid, lkid_owner(lkid),
                                               None if gr < 0 else Mode(gr),
                                               None if rq < 0 else Mode(rq), (rs, re_))
                except LockError as exc:
                    log.warning("dlm %s gen %d: recover lock %#x: %s", self.ls_name,
                                body["g"], lkid, exc)
                    continue
                self._note_lock_key(lkid, key)
            if gr >= 0:
                copies.append((gr, seq, bytes(lvb)))
        if not copies:
            copies.append((-1, 0, bytes(LVB_SIZE)))

    def _keep_lvb(self, key: bytes) -> None:
        """Remember the LVB of a resource we master already (a resync re-sends locks
        to a master that kept it) before the re-sent copies are weighed (step 7)."""
        try:
            self.ls_recover_kept[key] = self.ls_table.resource_lvb(key)
        except LockError:
            pass        # mastered but not in the table (no lock yet): nothing kept
