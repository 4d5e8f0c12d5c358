"""The master side of a lock: the node that keeps a resource's queues.

One `_receive_*` per message an owner sends (DLM_REQUEST, DLM_CONVERT,
DLM_UNLOCK, DLM_CANCEL), each ending in the C lock table (locktable.py, which
decides what is granted) and `_flush_table_events`, which tells the owners
what was granted and who blocks whom (DLM_GRANT, DLM_BAST). While recovery
runs, what arrives is kept for later (`_defer`).

Owns `ls_table` (the resources this node masters), `ls_mastered` (their
names) and `ls_deferred`. A request for a resource this node does not master
is answered "notmaster" and the directory is reminded (toss.py). A mixin of
`Lockspace`.
"""

from __future__ import annotations

from typing import Any

from clusterfs.dlm.interface import ConversionDeadlock, Mode
from clusterfs.dlm.lkb import lkid_owner
from clusterfs.dlm.locktable import EventType, Queue
from clusterfs.errors import LockError, WouldBlock
from clusterfs.wire.types import MsgType


class Master:
    """The master's half of the lock protocol (a mixin of Lockspace)."""

    def _defer(self, sender: int, mtype: int, body: dict[str, Any]) -> bool:
        """While recovery runs, the master side keeps what it receives for later."""
        if not self.ls_running:
            self.ls_deferred.append((sender, mtype, body))
            return True
        return False

    def _reply(self, owner: int, body: dict[str, Any]) -> None:
        self._send_or_local(owner, MsgType.DLM_REPLY, body)

    def _reply_granted(self, owner: int, lkid: int, mode: int, op: str) -> None:
        lvb, seq, valid = self.ls_table.lock_lvb(lkid)
        self._reply(owner, self._with_server(lkid, {
            "id": lkid, "op": op, "rc": "granted", "mode": mode, "lvb": lvb, "seq": seq,
            "valid": valid}))

    def _answer_again(self, owner: int, lkid: int) -> bool:
        """A request we already have, from its owner (the first copy rode a lookup
        whose reply a view change overtook, so the owner sent it again): answer with
        where it stands. False if the lock id is not that owner's."""
        info = self.ls_table.lock_info(lkid)
        if info is None or info.nodeid != owner:
            return False
        if info.queue == Queue.GRANTED and info.grmode is not None:
            self._reply_granted(owner, lkid, int(info.grmode), "request")
        else:
            self._reply(owner, {"id": lkid, "op": "request", "rc": "queued"})
        return True

    def _receive_request(self, sender: int, body: dict[str, Any]) -> None:
        if self._defer(sender, MsgType.DLM_REQUEST, body):
            return
        self._do_request(sender, body)

    def _do_request(self, owner: int, body: dict[str, Any]) -> None:
        key, lkid = body["name"], body["id"]
        if key not in self.ls_mastered:
            self._reply(owner, {"id": lkid, "op": "request", "rc": "notmaster"})
            self._repeat_remove(key)
            return
        try:
            granted = self.ls_table.request(key, lkid, owner, Mode(body["mode"]),
                                            (body["rs"], body["re"]), try_=body["try"])
        except WouldBlock:
            self._reply(owner, {"id": lkid, "op": "request", "rc": "eagain"})
            return
        except LockError as exc:
            if not self._answer_again(owner, lkid):
                self._reply(owner, {"id": lkid, "op": "request", "rc": f"error: {exc}"})
            return
        self._note_lock_key(lkid, key)
        if granted:
            self._reply_granted(owner, lkid, body["mode"], "request")
        else:
            self._reply(owner, {"id": lkid, "op": "request", "rc": "queued"})
        self._flush_table_events()

    def _receive_convert(self, sender: int, body: dict[str, Any]) -> None:
        if self._defer(sender, MsgType.DLM_CONVERT, body):
            return
        self._do_convert(sender, body)

    def _do_convert(self, owner: int, body: dict[str, Any]) -> None:
        lkid, down = body["id"], body["down"]
        self._bast_answered(lkid)
        lvb = body.get("lvb")
        try:
            granted = self.ls_table.convert(lkid, Mode(body["mode"]), try_=body["try"],
                                            lvb=bytes(lvb) if lvb is not None else None)
        except WouldBlock:
            rc = "eagain"
        except ConversionDeadlock:
            rc = "edeadlk"
        except LockError as exc:
            rc = f"error: {exc}"
        else:
            if not down:
                if granted:
                    self._reply_granted(owner, lkid, body["mode"], "convert")
                else:
                    self._reply(owner, {"id": lkid, "op": "convert", "rc": "queued"})
            self._flush_table_events()
            return
        if not down:
            self._reply(owner, {"id": lkid, "op": "convert", "rc": rc})

    def _receive_unlock(self, sender: int, body: dict[str, Any]) -> None:
        if self._defer(sender, MsgType.DLM_UNLOCK, body):
            return
        self._bast_answered(body["id"])
        lvb = body.get("lvb")
        try:
            self.ls_table.unlock(body["id"], bytes(lvb) if lvb is not None else None)
        except LockError:
            return
        self._forget_lock_key(body["id"])
        self._flush_table_events()

    def _receive_cancel(self, sender: int, body: dict[str, Any]) -> None:
        if self._defer(sender, MsgType.DLM_CANCEL, body):
            return
        self._bast_answered(body["id"])
        try:
            cancelled = self.ls_table.cancel(body["id"])
        except LockError:
            cancelled = False
        if cancelled and self.ls_table.lock_info(body["id"]) is None:
            self._forget_lock_key(body["id"])     # a waiting request, now gone
        self._reply(sender, {"id": body["id"], "op": "cancel",
                             "rc": "cancelled" if cancelled else "notqueued"})
        self._flush_table_events()

    def _flush_table_events(self) -> None:
        """Tell owners what the last table operation granted or is blocked on."""
        for ev in self.ls_table.events():
            owner = lkid_owner(ev.lkid)
            info = self.ls_table.lock_info(ev.lkid)
            if info is None:
                continue    # left over from an aborted recovery; the lock is gone
            if ev.type == EventType.DEADLOCK:
                # (only a rebuilt queue: a convert call is answered so at once) the
                # owner's conversion ends as a refused one does, back at its mode
                if info.queue == Queue.GRANTED:
                    self._send_or_local(owner, MsgType.DLM_REPLY, {
                        "id": ev.lkid, "op": "convert", "rc": "edeadlk"})
            elif ev.type == EventType.GRANT:
                if info.queue != Queue.GRANTED or info.grmode != ev.mode:
                    continue
                lvb, seq, valid = self.ls_table.lock_lvb(ev.lkid)
                self._send_or_local(owner, MsgType.DLM_GRANT, self._with_server(ev.lkid, {
                    "id": ev.lkid, "mode": int(ev.mode), "lvb": lvb, "seq": seq,
                    "valid": valid}))
            else:
                self._send_or_local(owner, MsgType.DLM_BAST,
                                    {"id": ev.lkid, "mode": int(ev.mode)})
                self._watch_bast(ev.lkid, owner)     # watch.py: until it demotes
