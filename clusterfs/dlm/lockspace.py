"""The distributed lock manager: lockspaces over an Endpoint and a Membership.

Shaped like the Linux DLM (fs/dlm), one file per concern. A `Lockspace` is
one object whose parts live in these modules (each a mixin working on the
lockspace's `ls_` fields; each module's docstring says which it owns):

- lockspace.py (here): the public API (the LockService protocol, statistics,
  dumps), message dispatch (one `_receive_*` per message type, in
  `_handlers`), and `Dlm`, a node's lockspaces and its one outgoing queue;
- owner.py: the owner side, the node whose task asked: `lock` ->
  `_request_lock` -> `_send_request` / the master's `_receive_request`, and
  later `_receive_grant` / `_receive_bast`;
- master.py: the master side, each `_receive_*` ending in the C lock table
  (clusterfs.dlm.locktable) and `_flush_table_events` (grants, basts);
- directory.py: the directory node of a resource is hash(name) over the
  sorted members; it records the master, the first node that asked;
- toss.py: a master frees resources idle for a while (DLM_REMOVE);
- members.py: membership events stop locking and start recovery;
- recovery.py: `_recover`, one straight list of logged steps, each aborted
  (trio cancellation) when a newer view arrives; barrier.py: its barriers;
- routing.py: with a storage group of block servers, every grant names the
  resource's preferred server (preferred.py chooses it);
- watch.py: an answer owed too long (a request, a lookup, a blocking callback,
  a recovery barrier) makes the node that owes it a suspect: membership probes it;
- lkb.py: the owner's lock block. Lock ids are unique in the cluster:
  (owner node id << 32) | counter, so a master needs no id translation and
  recovery re-sends locks as they are.

Field prefixes show the owner: `lkb_` an owner's lock block, `ls_` the
lockspace.
"""

from __future__ import annotations

import logging
import random
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import trio

from clusterfs.comms.interface import Endpoint, Envelope
from clusterfs.config import ANSWER_TIMEOUT_DEFAULT
from clusterfs.dlm import toss
from clusterfs.dlm.barrier import Barrier
from clusterfs.dlm.directory import Directory
from clusterfs.dlm.interface import (
    FULL_RANGE,
    RANGE_MAX,
    BlockingCallback,
    Lock,
    Mode,
    ResourceName,
    is_down_conversion,
    resource_key,
)
from clusterfs.dlm.lkb import Lkb, NotMaster, Status
from clusterfs.dlm.locktable import LockInfo, LockTable
from clusterfs.dlm.master import Master
from clusterfs.dlm.members import Members
from clusterfs.dlm.owner import Owner
from clusterfs.dlm.recovery import Recovery
from clusterfs.dlm.routing import Routing
from clusterfs.dlm.toss import Toss
from clusterfs.dlm.watch import Watch
from clusterfs.errors import LockCancelled, LockError, PeerUnreachable
from clusterfs.membership.view import Membership, View
from clusterfs.wire.types import MsgType

log = logging.getLogger("clusterfs.dlm")

DLM_TYPES = [t for t in MsgType if 32 <= t <= 79]
# A master answers a query at once (it is never deferred). One that is still in the
# view and does not answer (a message lost with a connection, or a frozen master not
# yet removed: watch.py has membership probe it) fails the query after this long.
QUERY_TIMEOUT = 5.0
QUERY_TRIES = 5         # masters dump_resource asks before it gives up (each moved on)
RECOVERY_TYPES = {MsgType.DLM_RECOVER_STATUS, MsgType.DLM_RECOVER_NAMES,
                  MsgType.DLM_RECOVER_LOCKS, MsgType.DLM_QUERY, MsgType.DLM_QUERY_REPLY}
# A DLM_BATCH's messages are judged one by one (_receive_batch), each as if alone
UNCHECKED_TYPES = RECOVERY_TYPES | {MsgType.DLM_BATCH}
# At most this many messages in one DLM_BATCH (a frame stays far below max_frame)
BATCH_MAX = 256


@dataclass(eq=False)
class Query:
    """A DLM_QUERY sent, its answer not in yet (dump_resource)."""

    master: int
    key: bytes
    done: trio.Event = field(default_factory=trio.Event)
    locks: list[dict[str, Any]] | None = None     # the answer; None: none came
    not_master: bool = False      # the node asked masters it no more (a stale cache)


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
    remote_lookups: int
    grants: int
    basts: int
    removed: int
    batches_sent: int        # DLM_BATCH messages sent (batched(), _receive_batch)
    deferred: int
    suspected: int           # nodes this lockspace asked membership to look at (watch.py)
    overdue: int             # answers overdue from nodes still heard from: not suspected

    def as_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


class Lockspace(Owner, Master, Directory, Toss, Members, Recovery, Barrier, Routing, Watch):
    """One lockspace on one node. Implements clusterfs.dlm.interface.LockService."""

    def __init__(self, dlm: Dlm, name: str) -> None:
        self.ls_name = name
        self.ls_dlm = dlm
        self.ls_node = dlm.node_id
        self._next_id = random.getrandbits(30)
        self.stats = {"requests": 0, "remote_requests": 0, "remote_lookups": 0,
                      "grants": 0, "basts": 0,
                      "removed": 0}
        self.ls_wake = trio.Event()                 # set and renewed on any progress
        self.ls_queries: dict[int, Query] = {}      # dump_resource's, by query id
        # owner.py
        self.ls_lkbs: dict[int, Lkb] = {}           # the locks this node owns
        # master.py
        self.ls_table = LockTable()                 # the resources this node masters
        self.ls_mastered: set[bytes] = set()        # keys this node is master of
        self.ls_deferred: list[tuple[int, int, dict[str, Any]]] = []
        # directory.py
        self.ls_master_of: dict[bytes, int] = {}    # owner's cache: key -> master
        self.ls_dir: dict[bytes, int] = {}          # directory entries this node keeps
        self.ls_lookups: dict[bytes, trio.Event] = {}
        self.ls_lookup_handled: dict[int, bool] = {}   # lock ids a lookup's master took
        # key -> the node that should be its directory node (then, as first asker,
        # usually its master): a user that knows which node uses which resources
        # keeps their lookups local (new_lockspace's dir_hint)
        self.ls_dir_hint: Callable[[bytes], int | None] | None = None
        self.ls_dir_ready = 0                       # generation whose directory is complete
        self.ls_rec_lookups: list[tuple[int, dict[str, Any]]] = []
        # toss.py
        self.ls_toss_seconds = toss.TOSS_SECONDS
        self.ls_toss_epoch = 0
        # members.py
        self.ls_view: View | None = None
        self.ls_members: frozenset[int] = frozenset()
        self.ls_gone: set[int] = set()              # removed members, never purged from
        self.ls_need_fence: set[int] = set()
        self.ls_resync: set[int] = set()            # joined since our last recovery
        self.ls_running = False
        self.ls_run_event = trio.Event()
        self.ls_expelled = False
        self._recover_scope: trio.CancelScope | None = None
        # recovery.py
        self.ls_recover_gen = 0
        self.ls_recover_lvbs: dict[bytes, list[tuple[int, int, bytes]]] = {}
        self.ls_recover_kept: dict[bytes, tuple[bytes, int, bool]] = {}
        self.ls_resync_with: frozenset[int] = frozenset()   # pairs resynchronised now
        self.ls_unconfirmed: set[bytes] = set()     # mastery set by an unfinished recovery
        self.ls_orphan_ops: list[tuple[bytes, int, dict[str, Any]]] = []
        self.ls_recoveries = 0
        # barrier.py
        self.ls_recover_status: dict[tuple[int, int], set[int]] = {}
        self.ls_resync_from: dict[int, set[int]] = {}
        self.ls_barrier_sent: dict[int, int] = {}
        # routing.py
        self._init_routing(dlm.servers)
        # watch.py
        self._init_watch(dlm.answer_timeout)
        # batching (batched(), _receive_batch): while either is on, what this
        # lockspace sends waits in a per-node outbox, in order, and goes as one
        # DLM_BATCH per node: at the end of a received batch, or (batched) at the
        # flusher's next turn
        self._outbox: dict[int, list[tuple[int, dict[str, Any]]]] = {}
        self._handling_batch = 0
        self._batching = 0
        self._flush_soon = trio.Event()
        self.stats["batches_sent"] = 0

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
            if isinstance(lkb.lkb_error, NotMaster):
                # the master we asked did not know the resource yet: ask again
                lkb.lkb_error, lkb.lkb_done, lkb.lkb_sent = None, trio.Event(), False
                self.ls_lkbs[lkb.lkb_id] = lkb
                await trio.sleep(0.005)
                continue
            if lkb.lkb_error is not None:
                lock.extra.pop("lkb", None)   # never handed out: handle <-> record cycle
                raise lkb.take_error()
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
        lkb.lkb_done, lkb.lkb_error, lkb.lkb_queued = trio.Event(), None, False
        self._send_convert(lkb, master, mode, try_=try_)
        if master != self.ls_node:
            self._watch_waiting(lkb)
        try:
            await lkb.lkb_done.wait()
        except BaseException:
            self._abandon(lkb, request=False)
            raise
        if lkb.lkb_error is not None:
            raise lkb.take_error()            # (a conversion deadlock, or cancelled)

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

    @contextmanager
    def batched(self) -> Iterator[None]:
        """While the body runs (and its tasks: many lock requests in flight at once,
        GlockManager.warm), the messages this lockspace sends are gathered per node
        and sent as one DLM_BATCH each, one scheduler turn later (the flusher task):
        a master answers a batch with one batch (_receive_batch). A listing of
        another node's directory then costs one frame per batch of lock requests
        each way, not three frames per lock (the lookup carrying the request, its
        reply and the request's reply). Everything to a node goes through its outbox
        meanwhile, in the order it was decided, so per-pair order holds."""
        self._batching += 1
        try:
            yield
        finally:
            self._batching -= 1
            if not self._batching and not self._handling_batch:
                self._flush_outbox()

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
        """The grant/convert/wait queues of a resource, asked of its master. A master
        that leaves the view before it answers is not waited for: the resource's master
        after the recovery is asked instead, as is the directory again when the master
        this node had cached masters it no more. TooSlowError if a master still in the
        view does not answer within QUERY_TIMEOUT."""
        key = resource_key(name)
        for _ in range(QUERY_TRIES):
            master = await self._find_master(key, assign=False)
            if master is None:
                return {"resource": key.decode(errors="replace"), "master": None,
                        "locks": []}
            if master == self.ls_node:
                local = self.dump_local(key)
                infos = None if local is None else [i.as_dict() for i in local]
            else:
                infos = await self._query(master, key)
            if infos is not None:
                return {"resource": key.decode(errors="replace"), "master": master,
                        "locks": infos}
            # the master left the view first, or our cached master was stale (the
            # resource moved; a lock request would have been answered "notmaster"):
            # ask the directory again. (An empty answer from a former master showed a
            # held journal slot as free in `clusterfs status`.)
            if self.ls_master_of.get(key) == master:
                self.ls_master_of.pop(key, None)
        raise LockError(f"{key.decode(errors='replace')}: its master moved {QUERY_TRIES} "
                        "times while asked; ask again")

    # -- DLM_QUERY: the queues of a resource, asked of its master -----------------
    async def _query(self, master: int, key: bytes) -> list[dict[str, Any]] | None:
        """Ask `master` for key's queues. None if it left the view first (`_stop`) or
        does not master it (any more)."""
        qid = self._new_lkid()
        query = Query(master, key)
        self.ls_queries[qid] = query
        self._send(master, MsgType.DLM_QUERY, {"q": qid, "name": key})
        self._watch_query(qid, master)             # watch.py: a frozen master
        try:
            with trio.fail_after(QUERY_TIMEOUT):
                await query.done.wait()
        finally:
            self.ls_queries.pop(qid, None)
        return None if query.not_master else query.locks

    def _end_queries(self, every: bool = False) -> None:
        """A new view: a query whose master left it will never be answered (`every`:
        this node was expelled, none will)."""
        for qid, query in list(self.ls_queries.items()):
            if every or query.master not in self.ls_members:
                del self.ls_queries[qid]
                query.done.set()

    def _receive_query(self, sender: int, body: dict[str, Any]) -> None:
        local = self.dump_local(body["name"])
        self._send(sender, MsgType.DLM_QUERY_REPLY,
                   {"q": body["q"], "locks": [i.as_dict() for i in local or []],
                    "notmaster": local is None})

    def _receive_query_reply(self, sender: int, body: dict[str, Any]) -> None:
        query = self.ls_queries.pop(body["q"], None)
        if query is not None:
            query.locks = body["locks"]
            query.not_master = bool(body.get("notmaster"))
            query.done.set()

    # =========================================================================
    # messages
    # =========================================================================
    def _send(self, dest: int, mtype: int, body: dict[str, Any]) -> None:
        if self._batching or self._handling_batch:
            self._outbox.setdefault(dest, []).append((int(mtype), body))
            if not self._handling_batch:
                self._flush_soon.set()   # (a received batch flushes at its end)
            return
        self.ls_dlm.send(dest, mtype, {"ls": self.ls_name, **body})

    def _flush_outbox(self) -> None:
        """Send what waits in the outboxes: a node's one message as itself, several
        as DLM_BATCHes of up to BATCH_MAX, in order."""
        outbox, self._outbox = self._outbox, {}
        for dest, messages in outbox.items():
            if len(messages) == 1:
                mtype, body = messages[0]
                self.ls_dlm.send(dest, mtype, {"ls": self.ls_name, **body})
                continue
            for start in range(0, len(messages), BATCH_MAX):
                self.stats["batches_sent"] += 1
                self.ls_dlm.send(dest, MsgType.DLM_BATCH, {
                    "ls": self.ls_name,
                    "m": [list(m) for m in messages[start:start + BATCH_MAX]]})

    async def _flush_loop(self) -> None:
        """The flusher: sends what batched() gathered, one scheduler turn after the
        first of it (by then every task started together has sent its request)."""
        while True:
            await self._flush_soon.wait()
            self._flush_soon = trio.Event()
            if not self._handling_batch:
                self._flush_outbox()

    def _receive_batch(self, sender: int, body: dict[str, Any]) -> None:
        """Handle each message of a batch as if it had come alone, in order; what that
        sends is gathered and goes at the end, as one batch per node."""
        self._handling_batch += 1
        try:
            for mtype, inner in body["m"]:
                if mtype == MsgType.DLM_BATCH:
                    continue             # (never sent: a batch holds plain messages)
                try:
                    self._dispatch(sender, int(mtype), inner)
                except (KeyError, TypeError, ValueError, AttributeError) as exc:
                    log.warning("dlm: bad message %r in a batch from node %d dropped: %r",
                                mtype, sender, exc)
        finally:
            self._handling_batch -= 1
            if not self._handling_batch:
                self._flush_outbox()

    def _send_or_local(self, dest: int, mtype: int, body: dict[str, Any]) -> None:
        if dest == self.ls_node:
            self._dispatch(self.ls_node, mtype, body)
        else:
            self._send(dest, mtype, body)

    def _dispatch(self, sender: int, mtype: int, body: dict[str, Any]) -> None:
        if mtype not in UNCHECKED_TYPES and sender != self.ls_node \
                and sender not in self.ls_members:
            # from a node outside our view (dead, not yet joined, or on the other side
            # of a partition): drop. If it comes back, the view that merges it names
            # it as joined, and recovery resynchronises our locks with it.
            return
        handler = self._handlers.get(mtype)
        if handler is not None:
            handler(self, sender, body)

    def _wake(self) -> None:
        """Wake every task waiting for progress (recovery steps, barriers)."""
        self.ls_wake.set()
        self.ls_wake = trio.Event()

    _handlers: ClassVar[dict[int, Any]] = {
        MsgType.DLM_REQUEST: Master._receive_request,
        MsgType.DLM_CONVERT: Master._receive_convert,
        MsgType.DLM_UNLOCK: Master._receive_unlock,
        MsgType.DLM_CANCEL: Master._receive_cancel,
        MsgType.DLM_REPLY: Owner._receive_reply,
        MsgType.DLM_GRANT: Owner._receive_grant,
        MsgType.DLM_BAST: Owner._receive_bast,
        MsgType.DLM_LOOKUP: Directory._receive_lookup,
        MsgType.DLM_LOOKUP_REPLY: Directory._receive_lookup_reply,
        MsgType.DLM_REMOVE: Toss._receive_remove,
        MsgType.DLM_RECOVER_STATUS: Barrier._receive_recover_status,
        MsgType.DLM_RECOVER_NAMES: Recovery._receive_recover_names,
        MsgType.DLM_RECOVER_LOCKS: Recovery._receive_recover_locks,
        MsgType.DLM_QUERY: _receive_query,
        MsgType.DLM_QUERY_REPLY: _receive_query_reply,
        MsgType.DLM_PREFER_ASK: Routing._receive_prefer_ask,
        MsgType.DLM_PREFER: Routing._receive_prefer,
        MsgType.DLM_BATCH: _receive_batch,
    }


class Dlm:
    """The lock manager of one node: its lockspaces.

    Every message is handed to the endpoint's per-peer queue at the moment it is
    decided (`Endpoint.send_nowait`), so what a node sends to a peer arrives in
    the order it was decided (recovery relies on it) without a queue and task of
    our own in between: that hop cost a trip through the scheduler per message.
    `servers`: the storage group's block servers, if any (routing.py).
    `answer_timeout`: how long an answer may be owed before its node is suspected
    (watch.py; None: never).
    """

    def __init__(self, endpoint: Endpoint, membership: Membership,
                 nursery: trio.Nursery, servers: Iterable[int] = (),
                 answer_timeout: float | None = ANSWER_TIMEOUT_DEFAULT) -> None:
        self.endpoint = endpoint
        self.answer_timeout = answer_timeout
        self.servers = frozenset(servers)
        self.membership = membership
        self.node_id = endpoint.node_id
        self.lockspaces: dict[str, Lockspace] = {}
        self._nursery = nursery
        self._early: dict[str, list[Envelope]] = {}
        self.dropped_sends = 0
        # inline: every DLM handler is a plain function, so the endpoint may run it
        # as the frame arrives instead of passing it to another task first
        endpoint.register_inline(DLM_TYPES, self._on_message)

    async def new_lockspace(self, name: str = "default",
                            dir_hint: Callable[[bytes], int | None] | None = None
                            ) -> Lockspace:
        """dir_hint(key): the node to be the resource's directory node while it is a
        member (None: by hash); every member must pass the same function."""
        ls = Lockspace(self, name)
        ls.ls_dir_hint = dir_hint
        self.lockspaces[name] = ls
        for env in self._early.pop(name, []):
            ls._dispatch(env.sender, env.type, env.body)
        self._nursery.start_soon(ls._event_loop, self.membership, self._nursery)
        self._nursery.start_soon(ls._toss_loop)
        self._nursery.start_soon(ls._watch_loop)
        self._nursery.start_soon(ls._flush_loop)
        await trio.lowlevel.checkpoint()
        return ls

    def send(self, dest: int, mtype: int, body: dict[str, Any]) -> None:
        try:
            self.endpoint.send_nowait(dest, mtype, body)
        except PeerUnreachable as exc:
            # a peer that is down is (or will be) out of the view: recovery covers it
            self.dropped_sends += 1
            log.debug("dlm: send %s to %d dropped: %s", MsgType(mtype).name, dest, exc)

    def _on_message(self, env: Envelope) -> None:
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
async def open_dlm(endpoint: Endpoint, membership: Membership,
                   servers: Iterable[int] = (),
                   answer_timeout: float | None = ANSWER_TIMEOUT_DEFAULT
                   ) -> AsyncIterator[Dlm]:
    """A node's lock manager; `servers`: the block servers grants name (routing.py);
    `answer_timeout`: [timeouts] answer_timeout (watch.py)."""
    async with trio.open_nursery() as nursery:
        dlm = Dlm(endpoint, membership, nursery, servers, answer_timeout)
        try:
            yield dlm
        finally:
            nursery.cancel_scope.cancel()


async def wait_running(ls: Lockspace) -> None:
    """Wait until the lockspace has finished its first (or current) recovery."""
    await ls._wait_running()
