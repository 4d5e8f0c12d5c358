"""The distributed lock manager: lockspaces over an Endpoint and a Membership.

Shaped like the Linux DLM (fs/dlm), in one file per concern:

- owner side (the node whose task asked): `lock` -> `_request_lock` (find the
  master, then local or remote) -> `_send_request` / the master's
  `_receive_request` -> `_do_request` (the C table decides) -> a reply, and
  later `_receive_grant` / `_receive_bast`;
- master side: one `_receive_*` per message type, each ending in the C lock
  table (clusterfs.dlm.locktable) and `_flush_table_events` (grants, basts);
- directory: the directory node of a resource is hash(name) over the sorted
  members; it records the master, the first node that asked;
- recovery (`_recover`, see there): one straight list of logged steps, each
  aborted (trio cancellation) when a newer view arrives.

Field prefixes show the owner: `lkb_` an owner's lock block, `ls_` the
lockspace. Lock ids are unique in the cluster: (owner node id << 32) | counter,
so a master needs no id translation and recovery re-sends locks as they are.
"""

from __future__ import annotations

import logging
import math
import os
import random
import zlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from enum import Enum
from functools import partial
from typing import Any

import trio

from clusterfs.comms.interface import Endpoint, Envelope
from clusterfs.dlm.interface import (
    FULL_RANGE,
    LVB_SIZE,
    RANGE_MAX,
    BlockingCallback,
    ConversionDeadlock,
    Lock,
    Mode,
    ResourceName,
    is_down_conversion,
    resource_key,
)
from clusterfs.dlm.locktable import EventType, LockInfo, LockTable, Queue
from clusterfs.errors import Expelled, LockCancelled, LockError, PeerUnreachable, WouldBlock
from clusterfs.membership.view import ExpelledEvent, Fenced, Membership, View, ViewChange
from clusterfs.wire.types import MsgType

log = logging.getLogger("clusterfs.dlm")

LKID_SHIFT = 32
BARRIER_RESEND = 0.5   # seconds between re-sends of a recovery status
# A master frees a resource with no locks after it stayed idle this long (and
# at most twice this long), like the Linux DLM's toss list (toss_secs = 10):
# long enough that lock/unlock cycles do not pay a directory lookup each time.
TOSS_SECONDS = float(os.environ.get("CLUSTERFS_DLM_TOSS_SECONDS", "10"))
DLM_TYPES = [t for t in MsgType if 32 <= t <= 79]
RECOVERY_TYPES = {MsgType.DLM_RECOVER_STATUS, MsgType.DLM_RECOVER_NAMES,
                  MsgType.DLM_RECOVER_LOCKS, MsgType.DLM_QUERY, MsgType.DLM_QUERY_REPLY}


class Status(Enum):
    WAITING = "waiting"        # a new request, not granted yet
    CONVERTING = "converting"  # granted at lkb_grmode, wants lkb_rqmode
    GRANTED = "granted"


class _NotMaster(LockError):
    """The node we sent to is not (yet) the master: look up again and resend."""


@dataclass(eq=False)
class Lkb:
    """The owner's record of one lock (the Linux DLM's struct dlm_lkb)."""

    lkb_id: int
    lkb_key: bytes
    lkb_lock: Lock
    lkb_status: Status
    lkb_grmode: Mode | None = None
    lkb_rqmode: Mode | None = None
    lkb_try: bool = False
    lkb_sent: bool = False          # the master has (or will get) the request
    lkb_abandoned: bool = False     # the asking task is gone: undo a late grant
    lkb_cancelling: bool = False    # a cancel is on its way to the master
    lkb_lvbseq: int = 0
    lkb_done: trio.Event = field(default_factory=trio.Event)
    lkb_error: BaseException | None = None


@dataclass(frozen=True)
class LockspaceStats:
    name: str
    node: int
    generation: int
    members: tuple[int, ...]
    quorate: bool
    running: bool
    recoveries: int
    owned_locks: int
    owned_granted: int
    owned_waiting: int
    mastered_resources: int
    idle_resources: int
    master_locks: int
    directory_entries: int
    requests: int
    remote_requests: int
    grants: int
    basts: int
    removed: int
    deferred: int

    def as_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


class Lockspace:
    """One lockspace on one node. Implements clusterfs.dlm.interface.LockService."""

    def __init__(self, dlm: Dlm, name: str) -> None:
        self.ls_name = name
        self.ls_dlm = dlm
        self.ls_node = dlm.node_id
        self.ls_table = LockTable()                 # the resources this node masters
        self.ls_lkbs: dict[int, Lkb] = {}           # the locks this node owns
        self.ls_mastered: set[bytes] = set()        # keys this node is master of
        self.ls_master_of: dict[bytes, int] = {}    # owner's cache: key -> master
        self.ls_dir: dict[bytes, int] = {}          # directory entries this node keeps
        self.ls_lookups: dict[bytes, trio.Event] = {}
        self.ls_view: View | None = None
        self.ls_members: frozenset[int] = frozenset()
        self.ls_gone: set[int] = set()              # removed members, never purged from
        self.ls_need_fence: set[int] = set()
        self.ls_running = False
        self.ls_run_event = trio.Event()
        self.ls_expelled = False
        self.ls_deferred: list[tuple[int, int, dict[str, Any]]] = []
        self.ls_recover_gen = 0
        self.ls_recover_status: dict[tuple[int, int], set[int]] = {}
        self.ls_barrier_sent: dict[int, int] = {}
        self.ls_dir_ready = 0                       # generation whose directory is complete
        self.ls_rec_lookups: list[tuple[int, dict[str, Any]]] = []
        self.ls_orphan_ops: list[tuple[bytes, int, dict[str, Any]]] = []
        self.ls_recover_lvbs: dict[bytes, list[tuple[int, int, bytes]]] = {}
        self.ls_unconfirmed: set[bytes] = set()     # mastery set by an unfinished recovery
        self.ls_wake = trio.Event()
        self.ls_recoveries = 0
        self.ls_queries: dict[int, tuple[trio.Event, list[Any]]] = {}
        self.ls_toss_seconds = TOSS_SECONDS
        self.ls_toss_epoch = 0
        self._next_id = random.getrandbits(30)
        self._recover_scope: trio.CancelScope | None = None
        self.stats = {"requests": 0, "remote_requests": 0, "grants": 0, "basts": 0,
                      "removed": 0}

    # =========================================================================
    # public: the LockService protocol
    # =========================================================================
    async def lock(
        self,
        name: ResourceName,
        mode: Mode,
        *,
        range: tuple[int, int] = FULL_RANGE,
        try_: bool = False,
        on_blocking: BlockingCallback | None = None,
    ) -> Lock:
        mode = Mode(mode)
        range = (int(range[0]), int(range[1]))
        if not 0 <= range[0] <= range[1] <= RANGE_MAX:
            raise LockError(f"bad range {range}")
        lock = Lock(name=name, mode=Mode.NL, range=range, on_blocking=on_blocking)
        lkb = Lkb(self._new_lkid(), resource_key(name), lock, Status.WAITING,
                  lkb_rqmode=mode, lkb_try=try_)
        lock.extra["lkb"] = lkb
        self.ls_lkbs[lkb.lkb_id] = lkb
        while True:
            try:
                await self._request_lock(lkb)
                await lkb.lkb_done.wait()     # granted at once: just a checkpoint
            except BaseException:
                self._abandon(lkb, request=True)
                raise
            if isinstance(lkb.lkb_error, _NotMaster):
                # the master we asked did not know the resource yet: ask again
                lkb.lkb_error, lkb.lkb_done, lkb.lkb_sent = None, trio.Event(), False
                self.ls_lkbs[lkb.lkb_id] = lkb
                await trio.sleep(0.005)
                continue
            if lkb.lkb_error is not None:
                raise lkb.lkb_error
            return lock

    async def convert(self, lock: Lock, mode: Mode, *, try_: bool = False) -> None:
        lkb = self._granted_lkb(lock)
        mode = Mode(mode)
        if mode == lkb.lkb_grmode:
            await trio.lowlevel.checkpoint()
            return
        assert lkb.lkb_grmode is not None
        if is_down_conversion(lkb.lkb_grmode, mode):
            # Always grantable: apply now, tell the master without waiting.
            self._down_convert(lkb, mode)
            await trio.lowlevel.checkpoint()
            return
        if not is_down_conversion(mode, lkb.lkb_grmode):
            # PR <-> CW: neither mode covers the other. Go down to CR (covered by
            # both) first, so that while we wait we never claim a protection the
            # master may already have given away at the grant.
            self._down_convert(lkb, Mode.CR)
        while True:
            await self._wait_running()
            master = self.ls_master_of.get(lkb.lkb_key)
            if master is not None and self.ls_running:
                break
            await trio.sleep(0.01)   # (not expected: a held lock's master is known)
        lkb.lkb_status, lkb.lkb_rqmode, lkb.lkb_try = Status.CONVERTING, mode, try_
        lkb.lkb_done, lkb.lkb_error = trio.Event(), None
        self._send_convert(lkb, master, mode, try_=try_)
        try:
            await lkb.lkb_done.wait()
        except BaseException:
            self._abandon(lkb, request=False)
            raise
        if lkb.lkb_error is not None:
            raise lkb.lkb_error

    async def unlock(self, lock: Lock) -> None:
        lkb = self._granted_lkb(lock)
        self._unlock_lkb(lkb)
        # No yield here: unlock never waits, and lock() yields once already
        # (a lock+unlock pair costs one trip through the scheduler).
        await trio.lowlevel.checkpoint_if_cancelled()

    async def cancel(self, lock: Lock) -> bool:
        """Cancel a waiting request or conversion; its waiter gets LockCancelled.

        Returns False when there was nothing waiting (already granted)."""
        lkb = lock.extra.get("lkb")
        await trio.lowlevel.checkpoint()
        if lkb is None or lkb.lkb_status == Status.GRANTED or lkb.lkb_done.is_set():
            return False
        if not lkb.lkb_sent:
            self._fail(lkb, LockCancelled(f"{lock.name} cancelled"))
            return True
        self._send_cancel(lkb)
        return True

    def statistics(self) -> LockspaceStats:
        v = self.ls_view
        owned = list(self.ls_lkbs.values())
        t = self.ls_table.statistics()
        return LockspaceStats(
            name=self.ls_name, node=self.ls_node,
            generation=v.generation if v else 0,
            members=tuple(sorted(self.ls_members)), quorate=bool(v and v.quorate),
            running=self.ls_running, recoveries=self.ls_recoveries,
            owned_locks=len(owned),
            owned_granted=sum(1 for lkb in owned if lkb.lkb_status == Status.GRANTED),
            owned_waiting=sum(1 for lkb in owned if lkb.lkb_status != Status.GRANTED),
            mastered_resources=len(self.ls_mastered), idle_resources=t.idle,
            master_locks=t.locks,
            directory_entries=len(self.ls_dir), deferred=len(self.ls_deferred),
            **self.stats,
        )

    def dump_local(self, key: bytes) -> list[LockInfo] | None:
        """The queues of a resource this node masters (None if it does not)."""
        if key not in self.ls_mastered:
            return None
        return self.ls_table.dump(key)

    async def dump_resource(self, name: ResourceName) -> dict[str, Any]:
        """The grant/convert/wait queues of a resource, asked of its master."""
        key = resource_key(name)
        master = await self._find_master(key, assign=False)
        if master is None:
            return {"resource": key.decode(errors="replace"), "master": None, "locks": []}
        if master == self.ls_node:
            infos = [i.as_dict() for i in (self.dump_local(key) or [])]
        else:
            qid = self._new_lkid()
            ev: tuple[trio.Event, list[Any]] = (trio.Event(), [])
            self.ls_queries[qid] = ev
            self._send(master, MsgType.DLM_QUERY, {"q": qid, "name": key})
            try:
                with trio.fail_after(5):
                    await ev[0].wait()
            finally:
                self.ls_queries.pop(qid, None)
            infos = ev[1][0]
        return {"resource": key.decode(errors="replace"), "master": master, "locks": infos}

    # =========================================================================
    # owner side
    # =========================================================================
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

    def _dir_node(self, key: bytes) -> int:
        members = sorted(self.ls_members)
        return members[zlib.crc32(key) % len(members)]

    async def _find_master(self, key: bytes, *, recovery: bool = False,
                           assign: bool = True) -> int | None:
        """The master of key: cached, or asked of the directory node (which makes
        the first asker the master). None if locking stopped meanwhile."""
        while True:
            if not recovery:
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
                self._send(dir_node, MsgType.DLM_LOOKUP,
                           {"name": key, "rec": recovery, "assign": assign,
                            "g": self.ls_recover_gen})
            await ev.wait()
            if key not in self.ls_master_of:
                if not assign:
                    return None
                await trio.sleep(0.005)   # wrong directory node: ask again

    def _set_master(self, key: bytes, master: int, recovery: bool) -> None:
        self.ls_master_of[key] = master
        if master == self.ls_node:
            self.ls_mastered.add(key)
        if recovery:
            self.ls_unconfirmed.add(key)

    async def _request_lock(self, lkb: Lkb) -> None:
        """Find the master and hand it the request: locally or over the wire."""
        while True:
            await self._wait_running()
            master = await self._find_master(lkb.lkb_key)
            if master is None or not self.ls_running:
                continue
            lkb.lkb_sent = True
            self.stats["requests"] += 1
            self._send_request(lkb, master)
            return

    def _send_request(self, lkb: Lkb, master: int) -> None:
        lock = lkb.lkb_lock
        assert lkb.lkb_rqmode is not None
        body = {"id": lkb.lkb_id, "name": lkb.lkb_key, "mode": int(lkb.lkb_rqmode),
                "rs": lock.range[0], "re": lock.range[1], "try": lkb.lkb_try}
        if master == self.ls_node:
            self._receive_request(self.ls_node, body)
        else:
            self.stats["remote_requests"] += 1
            self._send(master, MsgType.DLM_REQUEST, body)

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
        # else: its master is dead: recovery re-sends it at its new mode

    def _unlock_lkb(self, lkb: Lkb) -> None:
        lock = lkb.lkb_lock
        lvb = None
        if lkb.lkb_grmode is not None and lkb.lkb_grmode >= Mode.PW:
            lvb = bytes(lock.lvb[:LVB_SIZE]).ljust(LVB_SIZE, b"\0")
        self.ls_lkbs.pop(lkb.lkb_id, None)
        lock.granted = False
        master = self.ls_master_of.get(lkb.lkb_key)
        body = {"id": lkb.lkb_id, "lvb": lvb}
        if master is None and not self.ls_running:
            self.ls_orphan_ops.append((lkb.lkb_key, MsgType.DLM_UNLOCK, body))  # see above
            return
        if master is None or master not in self.ls_members:
            return   # its master is gone: recovery will not re-send it, so it is released
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
        self.stats["grants"] += 1
        if lkb.lkb_abandoned and was_request:
            self._unlock_lkb(lkb)         # nobody wants it any more
            return
        lkb.lkb_done.set()

    def _fail(self, lkb: Lkb, err: BaseException) -> None:
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
            pass
        elif rc == "notmaster":
            self.ls_master_of.pop(lkb.lkb_key, None)
            lkb.lkb_error = _NotMaster()
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

    def _receive_lookup_reply(self, sender: int, body: dict[str, Any]) -> None:
        key = body["name"]
        if body["rec"] and body.get("g") != self.ls_recover_gen:
            return   # an answer for a recovery that was overtaken: its mastery is void
        if body["master"] is not None:
            self._set_master(key, int(body["master"]), bool(body["rec"]))
        ev = self.ls_lookups.pop(key, None)
        if ev is not None:
            ev.set()

    # =========================================================================
    # directory side
    # =========================================================================
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
            self._send(sender, MsgType.DLM_LOOKUP_REPLY,
                       {"name": body["name"], "master": None, "rec": body["rec"],
                        "g": body.get("g")})
            return
        master = self._dir_lookup(body["name"], sender, body.get("assign", True))
        self._send(sender, MsgType.DLM_LOOKUP_REPLY,
                   {"name": body["name"], "master": master, "rec": body["rec"],
                    "g": body.get("g")})

    def _receive_remove(self, sender: int, body: dict[str, Any]) -> None:
        """DLM_REMOVE: the master freed an idle resource; forget its entry.

        Only an entry naming the sender goes: a newer master (the sender's
        remove raced with a lookup that came after it) keeps its entry. A
        remove from an earlier generation is dropped: recovery rebuilt the
        directory since, from what the masters really master."""
        if self._defer(sender, MsgType.DLM_REMOVE, body):
            return
        key = body["name"]
        if body.get("g") != self.ls_recover_gen or self._dir_node(key) != self.ls_node:
            return
        if self.ls_dir.get(key) == sender:
            del self.ls_dir[key]

    # =========================================================================
    # master side
    # =========================================================================
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
        self._reply(owner, {"id": lkid, "op": op, "rc": "granted", "mode": mode,
                            "lvb": lvb, "seq": seq, "valid": valid})

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
            self._reply(owner, {"id": lkid, "op": "request", "rc": f"error: {exc}"})
            return
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
        lvb = body.get("lvb")
        try:
            self.ls_table.unlock(body["id"], bytes(lvb) if lvb is not None else None)
        except LockError:
            return
        self._flush_table_events()

    def _receive_cancel(self, sender: int, body: dict[str, Any]) -> None:
        if self._defer(sender, MsgType.DLM_CANCEL, body):
            return
        try:
            cancelled = self.ls_table.cancel(body["id"])
        except LockError:
            cancelled = False
        self._reply(sender, {"id": body["id"], "op": "cancel",
                             "rc": "cancelled" if cancelled else "notqueued"})
        self._flush_table_events()

    def _receive_query(self, sender: int, body: dict[str, Any]) -> None:
        infos = [i.as_dict() for i in (self.dump_local(body["name"]) or [])]
        self._send(sender, MsgType.DLM_QUERY_REPLY, {"q": body["q"], "locks": infos})

    def _receive_query_reply(self, sender: int, body: dict[str, Any]) -> None:
        q = self.ls_queries.get(body["q"])
        if q is not None:
            q[1].append(body["locks"])
            q[0].set()

    def _flush_table_events(self) -> None:
        """Tell owners what the last table operation granted or is blocked on."""
        for ev in self.ls_table.events():
            owner = ev.lkid >> LKID_SHIFT
            info = self.ls_table.lock_info(ev.lkid)
            if info is None:
                continue    # left over from an aborted recovery; the lock is gone
            if ev.type == EventType.GRANT:
                if info.queue != Queue.GRANTED or info.grmode != ev.mode:
                    continue
                lvb, seq, valid = self.ls_table.lock_lvb(ev.lkid)
                self._send_or_local(owner, MsgType.DLM_GRANT,
                                    {"id": ev.lkid, "mode": int(ev.mode), "lvb": lvb,
                                     "seq": seq, "valid": valid})
            else:
                self._send_or_local(owner, MsgType.DLM_BAST,
                                    {"id": ev.lkid, "mode": int(ev.mode)})

    # -- idle resources: DLM_REMOVE ----------------------------------------------
    async def _toss_loop(self) -> None:
        """Every toss period, free the resources idle since before the last one
        (a period spent recovering is skipped; an expelled node stops)."""
        while not self.ls_expelled:
            await trio.sleep(self.ls_toss_seconds)
            self.remove_idle_resources()

    def remove_idle_resources(self, *, everything: bool = False) -> int:
        """Free mastered resources idle for a whole toss period (all idle ones
        with everything=True) and tell their directory nodes. Runs only while
        locking runs, and never awaits: no request can slip in between."""
        if not self.ls_running:
            return 0
        self.ls_toss_epoch += 1
        self.ls_table.set_epoch(self.ls_toss_epoch)
        before = self.ls_toss_epoch if everything else self.ls_toss_epoch - 1
        removed = 0
        for key in self.ls_table.drop_idle(before):
            if key in self.ls_mastered:
                self._remove_resource(key)
                removed += 1
        self.stats["removed"] += removed
        return removed

    def _remove_resource(self, key: bytes) -> None:
        """We no longer master key: forget it here and at its directory node.

        A request already on its way (the owner found us in its cache or in the
        directory before our remove got there) is answered "notmaster" and the
        owner looks up again; per-pair FIFO puts our own later lookup behind
        the remove at the directory node."""
        self.ls_mastered.discard(key)
        self.ls_master_of.pop(key, None)
        dir_node = self._dir_node(key)
        if dir_node == self.ls_node:
            if self.ls_dir.get(key) == self.ls_node:
                del self.ls_dir[key]
        else:
            self._send(dir_node, MsgType.DLM_REMOVE, {"name": key, "g": self.ls_recover_gen})

    def _repeat_remove(self, key: bytes) -> None:
        """A request came for a resource we do not master: the directory may
        still name us (a lost or slow remove), so say it again (Linux's
        send_repeat_remove). Not while our own lookup of it is under way: the
        directory may have just made us master."""
        if key in self.ls_lookups or key in self.ls_mastered or not self.ls_running:
            return
        dir_node = self._dir_node(key)
        if dir_node != self.ls_node:
            self._send(dir_node, MsgType.DLM_REMOVE, {"name": key, "g": self.ls_recover_gen})

    # =========================================================================
    # messages
    # =========================================================================
    def _send(self, dest: int, mtype: int, body: dict[str, Any]) -> None:
        self.ls_dlm.send(dest, mtype, {"ls": self.ls_name, **body})

    def _send_or_local(self, dest: int, mtype: int, body: dict[str, Any]) -> None:
        if dest == self.ls_node:
            self._dispatch(self.ls_node, mtype, body)
        else:
            self._send(dest, mtype, body)

    def _dispatch(self, sender: int, mtype: int, body: dict[str, Any]) -> None:
        if mtype not in RECOVERY_TYPES and sender != self.ls_node \
                and sender not in self.ls_members:
            return    # from a node outside our view (dead, or not yet joined): drop
        handler = self._handlers.get(mtype)
        if handler is not None:
            handler(self, sender, body)

    # =========================================================================
    # membership events and recovery
    # =========================================================================
    async def _event_loop(self, membership: Membership, nursery: trio.Nursery) -> None:
        events = membership.subscribe()
        async for ev in events:
            if isinstance(ev, ViewChange):
                self._stop(ev.view, ev.left)
                if self._recover_scope is not None:
                    self._recover_scope.cancel()
                if self.ls_node not in ev.view.members:
                    continue   # joining: wait for a view that holds us
                self._recover_scope = trio.CancelScope()
                nursery.start_soon(self._run_recovery, ev.view, self._recover_scope)
            elif isinstance(ev, Fenced):
                log.info("dlm %s gen %d: fenced %s", self.ls_name, ev.generation,
                         sorted(ev.nodes))
                self.ls_need_fence -= ev.nodes
                self._wake()
            elif isinstance(ev, ExpelledEvent):
                self._expel(ev.generation)

    def _stop(self, view: View, left: frozenset[int]) -> None:
        """Step 0 (at once, on the event): stop locking; requests wait."""
        log.info("dlm %s@%d gen %d: stop locking (members %s, left %s, quorate %s)",
                 self.ls_name, self.ls_node, view.generation, sorted(view.members), sorted(left),
                 view.quorate)
        self.ls_view = view
        self.ls_members = view.members
        self.ls_gone |= set(left)
        self.ls_gone -= view.members
        self.ls_need_fence |= set(left)
        self.ls_need_fence -= view.members
        if self.ls_running:
            self.ls_running = False
            self.ls_run_event = trio.Event()
        for ev in list(self.ls_lookups.values()):
            ev.set()     # normal lookups start over after recovery
        self.ls_lookups.clear()
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
        self.ls_run_event.set()

    def _wake(self) -> None:
        self.ls_wake.set()
        self.ls_wake = trio.Event()

    async def _run_recovery(self, view: View, scope: trio.CancelScope) -> None:
        with scope:
            try:
                await self._recover(view)
            except trio.Cancelled:
                log.info("dlm %s gen %d: recovery aborted by a newer view",
                         self.ls_name, view.generation)
                raise
        if scope.cancelled_caught:
            return

    def _rlog(self, g: int, step: str, *args: Any) -> None:
        log.info("dlm %s@%d gen %d: recover: " + step, self.ls_name, self.ls_node, g, *args)

    async def _recover(self, view: View) -> None:
        """ls_recover: rebuild the lock state for a new view, step by step.

        Runs on every member for every view. A newer view cancels it (trio
        cancellation at any await) and a fresh run starts from step 1; every
        step is idempotent or undone by step 4 of the next run."""
        g = view.generation
        self.ls_recover_gen = g
        self.ls_recover_lvbs = {}
        self.ls_rec_lookups = []
        # The directory is rebuilt from scratch (step 5). Clear it now, before
        # the first barrier: a faster member may send us its names right after it.
        self.ls_dir.clear()
        me = self.ls_node

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

        # 4. Forget the dead: purge the removed nodes' locks from our master
        #    table (marking the LVBs they may have written invalid) and cached
        #    masters that are gone. Masters chosen by an aborted recovery stay
        #    masters (some members may have finished that recovery and rely on
        #    it), but our locks on those resources are re-sent (step 6): the
        #    aborted run may not have delivered them all. Duplicates are skipped.
        purged = sum(self.ls_table.purge_node(n) for n in sorted(self.ls_gone))
        for key in self.ls_unconfirmed:
            self.ls_master_of.pop(key, None)
        self.ls_unconfirmed.clear()
        for key, master in list(self.ls_master_of.items()):
            if master not in view.members:
                del self.ls_master_of[key]
        self._rlog(g, "4 purged %d locks of %s", purged, sorted(self.ls_gone))

        # 5. Rebuild the directory over the members: every master tells each
        #    key's new directory node that it masters it (DLM_RECOVER_NAMES).
        by_dir: dict[int, list[bytes]] = {}
        for key in self.ls_mastered:
            by_dir.setdefault(self._dir_node(key), []).append(key)
        for dir_node, keys in by_dir.items():
            if dir_node == me:
                self.ls_dir.update(dict.fromkeys(keys, me))
            else:
                self._send(dir_node, MsgType.DLM_RECOVER_NAMES, {"g": g, "names": keys})
        self._rlog(g, "5 directory: sent %d names", len(self.ls_mastered))
        await self._barrier(g, 2)
        self.ls_dir_ready = g          # every member's names are in: answer lookups
        pending, self.ls_rec_lookups = self.ls_rec_lookups, []
        for sender, body in pending:
            self._receive_lookup(sender, body)

        # 6. New masters for resources whose master died: the first survivor
        #    to ask the directory becomes master; every owner re-sends its
        #    granted, converting and waiting locks there (DLM_RECOVER_LOCKS).
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
        op_keys = {key for key, _, _ in self.ls_orphan_ops} - set(orphans)
        async with trio.open_nursery() as nursery:
            for key in orphans:
                nursery.start_soon(partial(self._find_master, key, recovery=True))
            for key in op_keys:
                nursery.start_soon(partial(self._find_master, key, recovery=True,
                                           assign=False))
        for key, lkbs in orphans.items():
            entries = [self._recover_entry(lkb) for lkb in lkbs]
            master = self.ls_master_of[key]
            body = {"g": g, "name": key, "locks": entries}
            if master == me:
                self._receive_recover_locks(me, body)
            else:
                self._send(master, MsgType.DLM_RECOVER_LOCKS, body)
        # unlocks and down-conversions made while the master was unknown
        ops, self.ls_orphan_ops = self.ls_orphan_ops, []
        for key, mtype, body in ops:
            master = self.ls_master_of.get(key)
            if master is not None and master in view.members:
                self._send_or_local(master, mtype, body)
        self._rlog(g, "6 new masters for %d resources, %d locks re-sent, %d orphan ops",
                   len(orphans), sum(len(v) for v in orphans.values()), len(ops))
        await self._barrier(g, 3)

        # 7. Finish rebuilt resources: the LVB is the newest copy a survivor
        #    holds, valid only if a survivor holds more than CR (a dead PW/EX
        #    holder may have changed it otherwise). Then grant what can be.
        for key, copies in self.ls_recover_lvbs.items():
            best = max(copies, key=lambda c: c[1])
            valid = any(gr > Mode.CR for gr, _, _ in copies if gr >= 0)
            self.ls_table.set_resource_lvb(key, best[2], best[1], valid)
        for key in self.ls_mastered:
            self.ls_table.regrant(key)
        self._rlog(g, "7 rebuilt %d resources", len(self.ls_recover_lvbs))
        await self._barrier(g, 4)

        # 8. Resume locking: deferred messages, waiting requests, grants.
        self.ls_unconfirmed.clear()
        self.ls_gone.clear()
        self.ls_recoveries += 1
        self.ls_running = True
        self.ls_run_event.set()
        deferred, self.ls_deferred = self.ls_deferred, []
        self._flush_table_events()
        for sender, mtype, body in deferred:
            self._dispatch(sender, mtype, body)
        self._rlog(g, "8 done: locking resumed (%d deferred messages)", len(deferred))

    def _recover_entry(self, lkb: Lkb) -> list[Any]:
        lock = lkb.lkb_lock
        gr = -1 if lkb.lkb_grmode is None else int(lkb.lkb_grmode)
        rq = -1 if lkb.lkb_rqmode is None else int(lkb.lkb_rqmode)
        if lkb.lkb_status == Status.GRANTED:
            rq = -1
        return [lkb.lkb_id, gr, rq, lock.range[0], lock.range[1],
                bytes(lock.lvb[:LVB_SIZE]).ljust(LVB_SIZE, b"\0"), lkb.lkb_lvbseq]

    async def _barrier(self, g: int, step: int) -> None:
        # Status messages are idempotent: re-send them now and then, in case a
        # peer was not listening yet (a lockspace still starting, a reconnect).
        others = self.ls_members - {self.ls_node}
        self.ls_barrier_sent[g] = max(step, self.ls_barrier_sent.get(g, 0))
        while True:
            for n in sorted(others):
                self._send(n, MsgType.DLM_RECOVER_STATUS, {"g": g, "step": step})
            with trio.move_on_after(BARRIER_RESEND):
                while not others <= self.ls_recover_status.get((g, step), set()):
                    await self.ls_wake.wait()
                break
        for k in [k for k in self.ls_recover_status if k[0] < g]:
            del self.ls_recover_status[k]

    def _receive_recover_status(self, sender: int, body: dict[str, Any]) -> None:
        g, step = body["g"], body["step"]
        self.ls_recover_status.setdefault((g, step), set()).add(sender)
        if not body.get("echo") and self.ls_barrier_sent.get(g, 0) >= step:
            # we passed this barrier already; the sender may have missed our
            # status (it was not listening yet): answer once.
            self._send(sender, MsgType.DLM_RECOVER_STATUS, {"g": g, "step": step, "echo": True})
        self._wake()

    def _receive_recover_names(self, sender: int, body: dict[str, Any]) -> None:
        if body["g"] != self.ls_recover_gen:
            return
        for key in body["names"]:
            self.ls_dir[key] = sender

    def _receive_recover_locks(self, sender: int, body: dict[str, Any]) -> None:
        if body["g"] != self.ls_recover_gen:
            return     # from a recovery that was overtaken
        key = body["name"]
        self.ls_mastered.add(key)
        copies = self.ls_recover_lvbs.setdefault(key, [])
        for lkid, gr, rq, rs, re_, lvb, seq in body["locks"]:
            if self.ls_table.lock_info(lkid) is None:
                # (present already: re-sent after an aborted recovery; keep ours,
                # it may have moved on since - e.g. been granted)
                try:
                    self.ls_table.recover_lock(key, lkid, lkid >> LKID_SHIFT,
                                               None if gr < 0 else Mode(gr),
                                               None if rq < 0 else Mode(rq), (rs, re_))
                except LockError as exc:
                    log.warning("dlm %s gen %d: recover lock %#x: %s", self.ls_name,
                                body["g"], lkid, exc)
                    continue
            if gr >= 0:
                copies.append((gr, seq, bytes(lvb)))
        if not copies:
            copies.append((-1, 0, bytes(LVB_SIZE)))

    _handlers: dict[int, Any] = {
        MsgType.DLM_REQUEST: _receive_request,
        MsgType.DLM_CONVERT: _receive_convert,
        MsgType.DLM_UNLOCK: _receive_unlock,
        MsgType.DLM_CANCEL: _receive_cancel,
        MsgType.DLM_REPLY: _receive_reply,
        MsgType.DLM_GRANT: _receive_grant,
        MsgType.DLM_BAST: _receive_bast,
        MsgType.DLM_LOOKUP: _receive_lookup,
        MsgType.DLM_LOOKUP_REPLY: _receive_lookup_reply,
        MsgType.DLM_REMOVE: _receive_remove,
        MsgType.DLM_RECOVER_STATUS: _receive_recover_status,
        MsgType.DLM_RECOVER_NAMES: _receive_recover_names,
        MsgType.DLM_RECOVER_LOCKS: _receive_recover_locks,
        MsgType.DLM_QUERY: _receive_query,
        MsgType.DLM_QUERY_REPLY: _receive_query_reply,
    }


class Dlm:
    """The lock manager of one node: its lockspaces, one outgoing queue.

    All messages leave through one queue and one task, so that what a node
    sends to a peer arrives in the order it was decided (recovery relies on it).
    """

    def __init__(self, endpoint: Endpoint, membership: Membership,
                 nursery: trio.Nursery) -> None:
        self.endpoint = endpoint
        self.membership = membership
        self.node_id = endpoint.node_id
        self.lockspaces: dict[str, Lockspace] = {}
        self._nursery = nursery
        self._early: dict[str, list[Envelope]] = {}
        self._out_send, self._out_recv = trio.open_memory_channel[
            tuple[int, int, dict[str, Any]]](math.inf)
        self.dropped_sends = 0
        endpoint.register(DLM_TYPES, self._on_message)

    async def new_lockspace(self, name: str = "default") -> Lockspace:
        ls = Lockspace(self, name)
        self.lockspaces[name] = ls
        for env in self._early.pop(name, []):
            ls._dispatch(env.sender, env.type, env.body)
        self._nursery.start_soon(ls._event_loop, self.membership, self._nursery)
        self._nursery.start_soon(ls._toss_loop)
        await trio.lowlevel.checkpoint()
        return ls

    def send(self, dest: int, mtype: int, body: dict[str, Any]) -> None:
        self._out_send.send_nowait((dest, mtype, body))

    async def _sender(self) -> None:
        async for dest, mtype, body in self._out_recv:
            try:
                await self.endpoint.send(dest, mtype, body)
            except PeerUnreachable as exc:
                self.dropped_sends += 1
                log.debug("dlm: send %s to %d dropped: %s", MsgType(mtype).name, dest, exc)

    async def _on_message(self, env: Envelope) -> None:
        body = env.body
        name = body.get("ls") if isinstance(body, dict) else None
        if name is None:
            return
        ls = self.lockspaces.get(name)
        if ls is None:
            self._early.setdefault(name, []).append(env)
            return
        try:
            ls._dispatch(env.sender, env.type, body)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            # an authenticated but malformed message: drop it, keep serving
            log.warning("dlm: bad %s from node %d dropped: %r",
                        MsgType(env.type).name, env.sender, exc)

    def statistics(self) -> dict[str, Any]:
        return {"node": self.node_id, "dropped_sends": self.dropped_sends,
                "lockspaces": {n: ls.statistics().as_dict()
                               for n, ls in self.lockspaces.items()}}


@asynccontextmanager
async def open_dlm(endpoint: Endpoint, membership: Membership) -> AsyncIterator[Dlm]:
    async with trio.open_nursery() as nursery:
        dlm = Dlm(endpoint, membership, nursery)
        nursery.start_soon(dlm._sender)
        try:
            yield dlm
        finally:
            nursery.cancel_scope.cancel()


async def wait_running(ls: Lockspace) -> None:
    """Wait until the lockspace has finished its first (or current) recovery."""
    await ls._wait_running()
