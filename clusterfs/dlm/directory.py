"""The resource directory: which node masters a resource, and how to find out.

The directory node of a resource is hash(name) over the sorted members; it
records the master, which is the first node that asked (`_dir_lookup`). An
owner asks it once (`_find_master`, DLM_LOOKUP) and caches the answer in
`ls_master_of`; the directory node answers in `_receive_lookup`.

Owns `ls_dir` (the entries this node keeps as directory node), `ls_master_of`
(the owner's cache), `ls_lookups` (lookups on their way) and, for recovery,
`ls_dir_ready` / `ls_rec_lookups` (lookups that wait until every member has
re-sent its names, see recovery.py step 5). Entries go when a master frees an
idle resource (toss.py). A mixin of `Lockspace`.
"""

from __future__ import annotations

import zlib
from typing import Any

import trio

from clusterfs.dlm.lkb import Lkb
from clusterfs.wire.types import MsgType


class Directory:
    """Finding and recording masters (a mixin of Lockspace)."""

    def _dir_node(self, key: bytes) -> int:
        """The hinted node when the lockspace has a hint for key and that node is a
        member, else hash(key) over the sorted members. Every member must use the
        same hint (it comes from the shared config and device): two members that
        disagree send lookups to different directory nodes."""
        hint = self.ls_dir_hint(key) if self.ls_dir_hint is not None else None
        if hint is not None and hint in self.ls_members:
            return hint
        members = sorted(self.ls_members)
        return members[zlib.crc32(key) % len(members)]

    # -- the asking side (an owner, or recovery) ---------------------------------
    async def _find_master(self, key: bytes, *, recovery: bool = False,
                           assign: bool = True) -> int | None:
        """The master of key: cached, or asked of the directory node (which makes
        the first asker the master). None if locking stopped meanwhile."""
        while True:
            if recovery:
                # A recovery's lookup belongs to its view. Started by a step that a
                # newer view overtook before the lookup first ran, it must not choose
                # a master under the newer view's members (where this node may be
                # every resource's directory node): it would master what another
                # member masters already.
                await trio.lowlevel.checkpoint_if_cancelled()
            else:
                await self._wait_running()
            master = self.ls_master_of.get(key)
            if master is not None:
                return master
            dir_node = self._dir_node(key)
            if dir_node == self.ls_node:
                master = self._dir_lookup(key, self.ls_node, assign)
                if master is not None:
                    self._set_master(key, master, recovery)
                return master
            ev = self.ls_lookups.get(key)
            if ev is None:
                ev = self.ls_lookups[key] = trio.Event()
                self.stats["remote_lookups"] += 1
                self._send(dir_node, MsgType.DLM_LOOKUP,
                           {"name": key, "rec": recovery, "assign": assign,
                            "g": self.ls_recover_gen})
                if not recovery:
                    self._watch_lookup(key, dir_node)     # watch.py
            await ev.wait()
            if key not in self.ls_master_of:
                if not assign:
                    return None
                await trio.sleep(0.005)   # wrong directory node: ask again

    async def _find_master_or_request(self, lkb: Lkb) -> tuple[int | None, bool]:
        """The master of lkb's resource, as _find_master, but a lookup sent to another
        node carries lkb's request: a directory node that masters the resource itself
        handles it at once (the Linux DLM's lookup-as-request), so a lock on a resource
        at home on another node costs one round trip, not two. (master, True) then:
        the request's reply follows the lookup's. (None, False): ask again."""
        key = lkb.lkb_key
        dir_node = self._dir_node(key)
        if key in self.ls_master_of or key in self.ls_lookups or dir_node == self.ls_node:
            return await self._find_master(key), False
        ev = self.ls_lookups[key] = trio.Event()
        self.stats["remote_lookups"] += 1
        self._send(dir_node, MsgType.DLM_LOOKUP,
                   {"name": key, "rec": False, "assign": True, "g": self.ls_recover_gen,
                    "req": self._request_body(lkb)})
        self._watch_lookup(key, dir_node)                 # watch.py
        await ev.wait()
        if self.ls_lookup_handled.pop(lkb.lkb_id, False):
            return self.ls_master_of.get(key), True
        master = self.ls_master_of.get(key)
        if master is None:
            await trio.sleep(0.005)      # wrong directory node, or a view change
        return master, False

    def _set_master(self, key: bytes, master: int, recovery: bool) -> None:
        self.ls_master_of[key] = master
        if master == self.ls_node:
            self.ls_mastered.add(key)
        if recovery:
            self.ls_unconfirmed.add(key)

    def _receive_lookup_reply(self, sender: int, body: dict[str, Any]) -> None:
        key = body["name"]
        if body["rec"] and body.get("g") != self.ls_recover_gen:
            return   # an answer for a recovery that was overtaken: its mastery is void
        if body["master"] is not None:
            self._set_master(key, int(body["master"]), bool(body["rec"]))
        handled = body.get("handled")
        if handled is not None and int(handled) in self.ls_lkbs:
            self.ls_lookup_handled[int(handled)] = True
        ev = self.ls_lookups.pop(key, None)
        if ev is not None:
            ev.set()
        self.ls_lookup_since.pop(key, None)

    # -- the directory node's side --------------------------------------------
    def _dir_lookup(self, key: bytes, requester: int, assign: bool = True) -> int | None:
        master = self.ls_dir.get(key)
        if master is None or master not in self.ls_members:
            if not assign:
                return None
            master = self.ls_dir[key] = requester
        return master

    def _receive_lookup(self, sender: int, body: dict[str, Any]) -> None:
        if not body["rec"] and self._defer(sender, MsgType.DLM_LOOKUP, body):
            return
        if body["rec"] and body.get("g") != self.ls_recover_gen:
            return   # from a recovery that was overtaken: must not assign a master
        if body["rec"] and self.ls_dir_ready != self.ls_recover_gen:
            # Not every member's names are in yet (we have not passed barrier 2):
            # a name from a third node may still be on its way. Answer later.
            self.ls_rec_lookups.append((sender, body))
            return
        if self._dir_node(body["name"]) != self.ls_node:
            # Asked under another member list (the view changed since): we are
            # not its directory node now. The asker will ask again.
            self._reply_lookup(sender, body, None)
            return
        master = self._dir_lookup(body["name"], sender, body.get("assign", True))
        request = body.get("req")
        if request is not None and master == self.ls_node:
            # we master it: the request the lookup carries is handled here and now,
            # its reply sent after the lookup's (one round trip for the asker)
            self._reply_lookup(sender, body, master, handled=request["id"])
            self._do_request(sender, request)
            return
        self._reply_lookup(sender, body, master)

    def _reply_lookup(self, asker: int, body: dict[str, Any], master: int | None,
                      handled: int | None = None) -> None:
        reply = {"name": body["name"], "master": master, "rec": body["rec"],
                 "g": body.get("g")}
        if handled is not None:
            reply["handled"] = handled
        self._send(asker, MsgType.DLM_LOOKUP_REPLY, reply)
