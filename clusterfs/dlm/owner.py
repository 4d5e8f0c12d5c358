"""The owner side of a lock: the node whose task asked for it.

`Lockspace.lock` -> `_request_lock` (find the master, see directory.py) ->
`_send_request` -> the master (master.py, or this node itself) -> a
DLM_REPLY, and later a DLM_GRANT or DLM_BAST, each handled by one
`_receive_*` here. Conversions, unlocks and cancels go the same way.

Owns the lock blocks (`ls_lkbs`, lkb.py) and what happens to them: granted,
failed, abandoned by a cancelled task. A mixin of `Lockspace`: it works on the
lockspace's fields and sends through `Lockspace._send`; it is split out so the
owner's half of the protocol reads in one place, apart from the master's.
"""

from __future__ import annotations

import logging
from typing import Any

from clusterfs.dlm.interface import LVB_SIZE, ConversionDeadlock, Lock, Mode
from clusterfs.dlm.lkb import LKID_SHIFT, Lkb, NotMaster, Status
from clusterfs.errors import Expelled, LockCancelled, LockError, WouldBlock
from clusterfs.wire.types import MsgType

log = logging.getLogger("clusterfs.dlm")


class Owner:
    """The owner's half of the lock protocol (a mixin of Lockspace)."""

    def _new_lkid(self) -> int:
        self._next_id = (self._next_id + 1) & 0xFFFFFFFF
        return (self.ls_node << LKID_SHIFT) | self._next_id

    def _granted_lkb(self, lock: Lock) -> Lkb:
        lkb = lock.extra.get("lkb")
        if lkb is None or self.ls_lkbs.get(lkb.lkb_id) is not lkb \
                or lkb.lkb_status != Status.GRANTED:
            raise LockError(f"lock on {lock.name} is not held (or is busy)")
        return lkb

    async def _wait_running(self) -> None:
        while not self.ls_running:
            if self.ls_expelled:
                raise Expelled(f"lockspace {self.ls_name}: this node was expelled")
            await self.ls_run_event.wait()
        if self.ls_expelled:
            raise Expelled(f"lockspace {self.ls_name}: this node was expelled")

    async def _request_lock(self, lkb: Lkb) -> None:
        """Find the master and hand it the request: locally or over the wire."""
        while True:
            await self._wait_running()
            if lkb.lkb_done.is_set() or lkb.lkb_status != Status.WAITING:
                return                    # answered meanwhile (a lookup carried it)
            # (a reply may overtake the task's return from a lookup that carried it)
            lkb.lkb_queued = False
            master, handled = await self._find_master_or_request(lkb)
            if handled:                   # the directory node was the master: sent
                lkb.lkb_sent = True
                self.stats["requests"] += 1
                self.stats["remote_requests"] += 1
                self._watch_waiting(lkb)
                return
            self.ls_lookup_handled.pop(lkb.lkb_id, None)
            if master is None or not self.ls_running:
                continue
            lkb.lkb_sent = True
            self.stats["requests"] += 1
            self._send_request(lkb, master)
            return

    @staticmethod
    def _request_body(lkb: Lkb) -> dict[str, Any]:
        lock = lkb.lkb_lock
        assert lkb.lkb_rqmode is not None
        return {"id": lkb.lkb_id, "name": lkb.lkb_key, "mode": int(lkb.lkb_rqmode),
                "rs": lock.range[0], "re": lock.range[1], "try": lkb.lkb_try}

    def _send_request(self, lkb: Lkb, master: int) -> None:
        body = self._request_body(lkb)
        if master == self.ls_node:
            self._receive_request(self.ls_node, body)
        else:
            self.stats["remote_requests"] += 1
            self._send(master, MsgType.DLM_REQUEST, body)
            self._watch_waiting(lkb)

    def _send_convert(self, lkb: Lkb, master: int, mode: Mode, *, try_: bool = False,
                      down: bool = False, lvb: bytes | None = None) -> None:
        body: dict[str, Any] = {"id": lkb.lkb_id, "mode": int(mode), "try": try_,
                                "down": down, "lvb": lvb}
        if master == self.ls_node:
            self._receive_convert(self.ls_node, body)
        else:
            self._send(master, MsgType.DLM_CONVERT, body)

    def _down_convert(self, lkb: Lkb, mode: Mode) -> None:
        lock = lkb.lkb_lock
        assert lkb.lkb_grmode is not None
        lvb = None
        if lkb.lkb_grmode >= Mode.PW and mode < Mode.PW:
            lvb = bytes(lock.lvb[:LVB_SIZE]).ljust(LVB_SIZE, b"\0")
            lock.lvb, lkb.lkb_lvbseq, lock.lvb_valid = lvb, lkb.lkb_lvbseq + 1, True
        lkb.lkb_grmode = lock.mode = mode
        master = self.ls_master_of.get(lkb.lkb_key)
        if master is not None and master in self.ls_members:
            self._send_convert(lkb, master, mode, down=True, lvb=lvb)
        elif master is None and not self.ls_running:
            # Recovery forgot the master (an aborted run may have re-sent the
            # lock at its old mode somewhere): tell whoever masters it (step 6).
            self.ls_orphan_ops.append((lkb.lkb_key, MsgType.DLM_CONVERT,
                                       {"id": lkb.lkb_id, "mode": int(mode), "try": False,
                                        "down": True, "lvb": lvb}))
        # else: its master is outside our view (dead, or across a partition): recovery
        # re-sends the lock at its new mode (to a new master, or in a resync)

    def _unlock_lkb(self, lkb: Lkb) -> None:
        lock = lkb.lkb_lock
        lvb = None
        if lkb.lkb_grmode is not None and lkb.lkb_grmode >= Mode.PW:
            lvb = bytes(lock.lvb[:LVB_SIZE]).ljust(LVB_SIZE, b"\0")
        self.ls_lkbs.pop(lkb.lkb_id, None)
        # the handle and its record point at each other: a cycle only a garbage
        # collection freed, so every lock released waited for one (two nodes doing 300
        # creates, writes, lookups and reads in one process: 2998 objects in cycles
        # before, none after; tests/test_dlm.py's cycle test)
        lock.extra.pop("lkb", None)
        lock.granted = False
        master = self.ls_master_of.get(lkb.lkb_key)
        body = {"id": lkb.lkb_id, "lvb": lvb}
        if master is None and not self.ls_running:
            self.ls_orphan_ops.append((lkb.lkb_key, MsgType.DLM_UNLOCK, body))  # see above
            return
        if master is None or master not in self.ls_members:
            # its master is outside our view: recovery will not re-send it, so it is
            # released (a master that comes back purges it in the resync)
            return
        if master == self.ls_node:
            self._receive_unlock(self.ls_node, body)
        else:
            self._send(master, MsgType.DLM_UNLOCK, body)

    def _send_cancel(self, lkb: Lkb) -> None:
        if lkb.lkb_cancelling:
            return
        lkb.lkb_cancelling = True
        master = self.ls_master_of.get(lkb.lkb_key)
        if master is None or master not in self.ls_members:
            return   # recovery resolves it (the request is not re-sent)
        body = {"id": lkb.lkb_id}
        if master == self.ls_node:
            self._receive_cancel(self.ls_node, body)
        else:
            self._send(master, MsgType.DLM_CANCEL, body)
            if lkb.lkb_id not in self.ls_waiting:
                self._watch_waiting(lkb)

    def _abandon(self, lkb: Lkb, *, request: bool) -> None:
        """The task waiting for lkb was cancelled (trio cancellation)."""
        if lkb.lkb_done.is_set():
            if request and lkb.lkb_error is None and self.ls_lkbs.get(lkb.lkb_id) is lkb:
                self._unlock_lkb(lkb)   # granted in the same instant: give it back
            return
        if lkb.lkb_status == Status.WAITING and not lkb.lkb_sent:
            self.ls_lkbs.pop(lkb.lkb_id, None)
            return
        lkb.lkb_abandoned = True
        self._send_cancel(lkb)

    def _granted(self, lkb: Lkb, body: dict[str, Any]) -> None:
        lock = lkb.lkb_lock
        was_request = lkb.lkb_status == Status.WAITING
        lkb.lkb_status, lkb.lkb_grmode, lkb.lkb_rqmode = Status.GRANTED, Mode(body["mode"]), None
        lock.mode, lock.granted = lkb.lkb_grmode, True
        lock.lvb, lock.lvb_valid = bytes(body["lvb"]), bool(body["valid"])
        lkb.lkb_lvbseq = int(body["seq"])
        if "ps" in body:
            self._take_server(lkb, int(body["ps"]))
        self.stats["grants"] += 1
        self._unwatch_waiting(lkb.lkb_id)
        if lkb.lkb_abandoned and was_request:
            self._unlock_lkb(lkb)         # nobody wants it any more
            return
        lkb.lkb_done.set()

    def _fail(self, lkb: Lkb, err: BaseException) -> None:
        self._unwatch_waiting(lkb.lkb_id)
        if lkb.lkb_status == Status.WAITING:
            self.ls_lkbs.pop(lkb.lkb_id, None)
        else:
            lkb.lkb_status, lkb.lkb_rqmode = Status.GRANTED, None
        lkb.lkb_error = err
        lkb.lkb_done.set()

    # -- owner-side receivers ---------------------------------------------------
    def _receive_reply(self, sender: int, body: dict[str, Any]) -> None:
        lkb = self.ls_lkbs.get(body["id"])
        if lkb is None:
            if body.get("op") == "request" and body["rc"] == "granted":
                # a request whose task was cancelled before it knew the request had
                # gone (a lookup carried it): give the lock back at once
                self._send_or_local(sender, MsgType.DLM_UNLOCK, {"id": body["id"],
                                                                 "lvb": None})
            return
        rc = body["rc"]
        if body.get("op") == "cancel":
            lkb.lkb_cancelling = False
            if rc == "cancelled":
                self._fail(lkb, LockCancelled(f"{lkb.lkb_lock.name} cancelled"))
            return
        if rc == "granted":
            self._granted(lkb, body)
        elif rc == "queued":
            lkb.lkb_queued = True     # answered; watch.py still waits for the grant
        elif rc == "notmaster":
            self.ls_master_of.pop(lkb.lkb_key, None)
            lkb.lkb_error = NotMaster()
            lkb.lkb_done.set()
        elif rc == "eagain":
            self._fail(lkb, WouldBlock(f"{lkb.lkb_lock.name} busy"))
        elif rc == "edeadlk":
            self._fail(lkb, ConversionDeadlock(f"{lkb.lkb_lock.name}: conversion deadlock"))
        else:
            self._fail(lkb, LockError(f"{lkb.lkb_lock.name}: {rc}"))

    def _receive_grant(self, sender: int, body: dict[str, Any]) -> None:
        lkb = self.ls_lkbs.get(body["id"])
        if lkb is None:
            # A grant for a lock we no longer have: give it back at once.
            self._send_or_local(sender, MsgType.DLM_UNLOCK, {"id": body["id"], "lvb": None})
            return
        if lkb.lkb_status == Status.GRANTED:
            return
        self._granted(lkb, body)

    def _receive_bast(self, sender: int, body: dict[str, Any]) -> None:
        lkb = self.ls_lkbs.get(body["id"])
        if lkb is None or lkb.lkb_abandoned:
            return
        self.stats["basts"] += 1
        cb = lkb.lkb_lock.on_blocking
        if cb is not None:
            try:
                cb(Mode(body["mode"]))
            except Exception:
                log.exception("dlm %s: blocking callback failed", self.ls_name)

