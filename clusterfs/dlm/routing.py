"""Preferred servers in lock grants (proxy I/O; the choice itself is preferred.py).

When the cluster has a storage group of block servers (`Dlm(servers=...)`), every
grant a master sends (DLM_REPLY "granted", DLM_GRANT) carries `ps`, the preferred
server of the lock's resource among the live servers of the master's view. The
owner keeps it in `Lock.server` and tells `Lockspace.on_preferred(key, server)`
(a proxy device routes the I/O under the lock by it).

A grant can outlive its server. So an owner asks again (DLM_PREFER_ASK {ids,
avoid, a} -> DLM_PREFER {locks: [[id, server], ...], a}, batched per master; `a`
is the ask's id, and the master answers every ask that carries one, naming
nothing if it has nothing to name):

- after every recovery in which the live servers changed, for all its granted
  locks (so a server that left is named by no lock, and one that joined takes its
  share of them);
- when its proxy found a server silent (`reprefer(server)`), for the locks naming
  it, with that server in `avoid`: the master names the next server of each
  resource's order while the view still holds the silent one.

Nobody waits for the answer: the proxy routes around a silent server by itself.
But an ask is owed its answer (`ls_asks`, ask id -> the master and what it was to
avoid), and watch.py has membership probe a master that leaves one unanswered for
answer_timeout while also silent: a frozen master of locks that are all held is
owed nothing else, so it would otherwise be found only by the failure timeout. A
view change ends every ask (`_end_asks`): the master's answer may never come (it
left; or it drops the asks of a node it resynchronises with), so the recovery's
step 8 asks again, for every granted lock, avoiding what those asks avoided.

The master needs a lock's resource to choose, and the C lock table knows a lock
only by id: `ls_lock_keys` maps the ids of the locks this node masters to their
resource keys (kept only with a storage group: nothing is paid without one). An
entry outliving its lock (an aborted recovery's leftovers) is harmless: ids are
unique, and a lock the table no longer has is never named.

A mixin of `Lockspace`; owns `ls_servers`, `ls_lock_keys`, `ls_live_servers`,
`ls_avoid`, `ls_asks` and `on_preferred`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

from clusterfs.dlm.lkb import Lkb, Status, lkid_owner
from clusterfs.dlm.preferred import preferred_server
from clusterfs.wire.types import MsgType

log = logging.getLogger("clusterfs.dlm")

ASK_BATCH = 512              # lock ids per DLM_PREFER_ASK


class Routing:
    """The master's choice of a preferred server, the owner's record of it."""

    ls_servers: frozenset[int]
    ls_lock_keys: dict[int, bytes]
    ls_live_servers: frozenset[int]
    ls_avoid: set[int]
    ls_asks: dict[int, tuple[int, frozenset[int]]]     # ask id -> (master, avoid)
    on_preferred: Callable[[bytes, int], None] | None

    def _init_routing(self, servers: Iterable[int]) -> None:
        self.ls_servers = frozenset(servers)
        self.ls_lock_keys = {}
        self.ls_live_servers = frozenset()
        self.ls_avoid = set()
        self.ls_asks = {}
        self.on_preferred = None

    def _live_servers(self) -> frozenset[int]:
        return self.ls_servers & self.ls_members

    # -- master side ---------------------------------------------------------------
    def _note_lock_key(self, lkid: int, key: bytes) -> None:
        if self.ls_servers:
            self.ls_lock_keys[lkid] = key

    def _forget_lock_key(self, lkid: int) -> None:
        self.ls_lock_keys.pop(lkid, None)

    def _forget_keys_of(self, nodes: Iterable[int]) -> None:
        """The locks of purged nodes are gone from our table."""
        gone = set(nodes)
        if gone and self.ls_lock_keys:
            for lkid in [i for i in self.ls_lock_keys if lkid_owner(i) in gone]:
                del self.ls_lock_keys[lkid]

    def _named_server(self, lkid: int, avoid: Iterable[int] = ()) -> int | None:
        """The preferred server of the resource of lock `lkid` (which we master)."""
        key = self.ls_lock_keys.get(lkid)
        if key is None:
            return None
        return preferred_server(key, self._live_servers(), avoid)

    def _with_server(self, lkid: int, body: dict[str, Any]) -> dict[str, Any]:
        """A grant's body, naming the preferred server when there is one."""
        server = self._named_server(lkid)
        if server is not None:
            body["ps"] = server
        return body

    def _receive_prefer_ask(self, sender: int, body: dict[str, Any]) -> None:
        if self._defer(sender, MsgType.DLM_PREFER_ASK, body):
            return
        avoid = [int(s) for s in body["avoid"]]
        named = []
        for lkid in body["ids"]:
            if self.ls_table.lock_info(lkid) is None:
                continue           # not ours (any more): the owner keeps what it has
            server = self._named_server(lkid, avoid)
            if server is not None:
                named.append([lkid, server])
        aid = body.get("a")
        if aid is not None:          # owed an answer, if only "nothing to name"
            self._send_or_local(sender, MsgType.DLM_PREFER, {"locks": named, "a": aid})
        elif named:
            self._send_or_local(sender, MsgType.DLM_PREFER, {"locks": named})

    # -- owner side ----------------------------------------------------------------
    def _take_server(self, lkb: Lkb, server: int) -> None:
        lkb.lkb_lock.server = server
        if self.on_preferred is not None:
            self.on_preferred(lkb.lkb_key, server)

    def _receive_prefer(self, sender: int, body: dict[str, Any]) -> None:
        aid = body.get("a")
        if aid is not None:
            self.ls_asks.pop(aid, None)        # answered (watch.py stops watching it)
        for lkid, server in body["locks"]:
            lkb = self.ls_lkbs.get(lkid)
            if lkb is not None and lkb.lkb_status == Status.GRANTED:
                self._take_server(lkb, int(server))

    def reprefer(self, silent: int) -> None:
        """Our I/O found `silent` not answering: ask the masters to name another
        server for every lock that names it (after the next recovery if locking is
        stopped now). Never waits; call from the trio thread."""
        if not self.ls_servers:
            return
        if not self.ls_running:
            self.ls_avoid.add(silent)
            return
        naming = [lkb for lkb in self.ls_lkbs.values()
                  if lkb.lkb_status == Status.GRANTED and lkb.lkb_lock.server == silent]
        self._ask_servers(naming, {silent})

    def _reprefer_after_recovery(self) -> None:
        """Recovery step 8: if the live servers changed, every granted lock is named
        again; else only those naming a server found silent meanwhile."""
        live = self._live_servers()
        changed, self.ls_live_servers = live != self.ls_live_servers, live
        avoid, self.ls_avoid = self.ls_avoid & live, set()
        if not self.ls_servers:
            return
        granted = [lkb for lkb in self.ls_lkbs.values() if lkb.lkb_status == Status.GRANTED]
        if not changed:
            granted = [lkb for lkb in granted if lkb.lkb_lock.server in avoid]
        self._ask_servers(granted, avoid)

    def _ask_servers(self, lkbs: list[Lkb], avoid: set[int]) -> None:
        by_master: dict[int, list[int]] = {}
        for lkb in lkbs:
            master = self.ls_master_of.get(lkb.lkb_key)
            if master is not None and master in self.ls_members:
                by_master.setdefault(master, []).append(lkb.lkb_id)
        for master, ids in by_master.items():
            for at in range(0, len(ids), ASK_BATCH):
                self._ask(master, ids[at : at + ASK_BATCH], frozenset(avoid))
        if by_master:
            log.info("dlm %s@%d: asked %d master(s) to name the servers of %d locks "
                     "again (avoiding %s)", self.ls_name, self.ls_node, len(by_master),
                     sum(map(len, by_master.values())), sorted(avoid))

    def _ask(self, master: int, ids: list[int], avoid: frozenset[int]) -> None:
        aid = self._new_lkid()
        # recorded before the send: a local master answers within it
        self.ls_asks[aid] = (master, avoid)
        self._send_or_local(master, MsgType.DLM_PREFER_ASK,
                            {"ids": ids, "avoid": sorted(avoid), "a": aid})
        self._watch_ask(aid, master)          # watch.py: a frozen master

    def _end_asks(self) -> None:
        """A new view (members.py): an ask's answer may never come now. Step 8 of the
        recovery names every granted lock's server again (as if the live servers had
        changed), avoiding what the asks avoided."""
        if not self.ls_asks:
            return
        for _, avoid in self.ls_asks.values():
            self.ls_avoid |= avoid
        self.ls_asks.clear()
        self.ls_live_servers = frozenset()

    def preferred_servers(self) -> dict[str, int]:
        """The server each granted lock's grant named (for status and tests)."""
        return {lkb.lkb_key.decode(errors="replace"): lkb.lkb_lock.server
                for lkb in self.ls_lkbs.values()
                if lkb.lkb_status == Status.GRANTED and lkb.lkb_lock.server is not None}
