"""ProxyDevice: the disk of a node without a path of its own, reached through the
block servers of the storage group (storage/blockserver.py; protocol in
storage/blockwire.py). Same interface as BlockDevice and IscsiDevice.

Routing (docs/storage.md, "Preferred servers"). Every block lies in a region of
the disk covered by one lock resource: a journal (("journal", slot)), a resource
group (("rgrp", n): its bitmap and every inode and data block allocated in it),
else the fixed area (("live",)); the mount hands that map over (`route_by`).
Every lock grant names the preferred server of its resource (clusterfs.dlm:
routing.py, preferred.py), and the mount passes each one on (`prefer`). An I/O
goes to the server the latest grant of its region's resource named, if that one
is live (a member of this node's current view and not found silent); else to the
first live server of the resource's rendezvous order, which is what a grant
would name (a region this node holds no lock on, or whose server went away
since), the others following in that order.

Re-target on ETIMEDOUT (../shared/seeds/000). Every request has `io_timeout`
seconds (config `[storage] io_timeout`, well below failure_timeout), except one
sent from a thread that runs a trio event loop, which has `loop_timeout`
(io_timeout / LOOP_SHARE): the mount's fs and journal call the device
synchronously on its loop, and everything else that node does (lock callbacks,
comms acks, membership, its control socket) waits while such a call does. So a
call on the loop waits at most loop_timeout for a server before it goes to the
next one; a worker thread's (drain, flush, checkpoint) waits io_timeout. When a
server does not answer in time, refuses, or its connection breaks, the proxy
marks it silent (for SILENT_FOR seconds or until the view changes), logs it,
calls `on_silent(server, waited)` (the mount asks the masters for new preferred
servers there, and has membership probe that node if it has not been heard from,
not even a heartbeat, for as long as it owed the answer: node/storagegroup.py),
and retries the request on the next live server of the resource's order; the
caller sees no error. Only when no
server is left does the I/O fail (StorageError).

No acknowledged write is lost. A server acknowledges a write once its device
took it, but only a flush makes it durable. So the proxy keeps every write since
the last completed flush (at most LOG_LIMIT bytes: past that it flushes by
itself), and when a server that took some of them goes silent it sends the whole
log again, in order, through another server before going on. A flush goes to
every server written through since the last one.

The writes a silent server may still hold (it was stopped or slow, not dead) must
not land after the proxy gave up on them: a later write of the same bytes through
another server could be under way. Each write carries `by` (storage/blockwire.py):
its send time mapped onto the server's clock (through a lower bound of the clocks'
offset that every reply refines) plus half its wait; the server refuses it if it
reaches the disk later. So none starts after its wait ran out, wherever it sat
meanwhile (in socket buffers, behind a held or stopped event loop). A server removed
from the view is also fenced by the survivors before any recovery.

Maybe in flight. `by` bounds when a write starts, not when it ends: a server may
start one in time and its device then take longer than the proxy waits (a slow
disk, a stalled thread), and nothing stops a device write under way (closing the
connection does not: the server's I/O threads finish what they took). Such a write
may land at any time until its server is done with it. So a write whose reply did
not come is "maybe in flight", and the rule is: no write that overlaps its bytes
and is newer (every write is numbered when accepted) goes to any server until it is
settled, that is until its server
- answered it (late: ok or refused, the server answers once its device is done), or
- closed the connection. The proxy half-closes it (no more requests: the server
  reads their end) and keeps reading it; a block server closes a connection only
  once every request it read from it has finished its I/O (storage/blockserver.py),
  and a killed one's sockets close only once its threads left their system calls;
- or was fenced: removed from the view and cut off by the survivors' fence
  (`server_fenced`, from membership's Fenced event: node/storagegroup.py), in a
  view after the last one a write went out there in. Leaving this node's view is
  not enough: until the fence is done (the process agent saw the process gone, a
  PREEMPT AND ABORT went through) a server whose disk stalled a write can still
  land it (a removed server with a hung disk, a stopped one let go before its
  fence). A clean leave is not fenced: the close settles its writes.
A newer overlapping write meanwhile is held: kept in memory (it is in the log,
which LOG_LIMIT bounds) and not sent, and the caller goes on, so a call on the event
loop never waits for a slow server (that loop runs membership, which is what removes
a stopped one). Reads are patched with the held writes: none returns an older copy
after a newer was written. Every call first looks, without waiting, for late answers
and closes and sends the held writes nothing older blocks any more. A flush and a
drain wait until nothing is maybe in flight or held (the device lock released while
they wait): after either, another node may take the lock over these bytes and write
them, and a late write landing then would be as stale. That wait is bounded
(settle_timeout: SETTLE_SHARE x the failure timeout): a server that neither answers
nor is fenced that long fails the flush (StorageError: the mount withdraws) rather
than hang or lose a write. A server alive with a hung disk stops serving and
fences itself well before that (storage/blockserver.py, "A hung disk"). The log
re-sent after a silence follows the same rule without waiting for the server that
went silent: each of its writes over a byte that one may still write is that very
write or an older one (nothing newer over it was sent), and the re-send ends with
the newest.

Several requests in flight (up to WINDOW per device). A read or write larger
than PIECE is cut into pieces sent all at once, and `write_behind` (file data)
sends its write (once it leaves the queued run, below) without waiting: its reply
is read later, when the window is full, at `drain`, at a flush, or before any
request that overlaps it (so a read never overtakes a write of the same bytes,
nor a write another, since the server works on a connection's requests side by
side). Each request has its own io_timeout from its send; the first that times
out makes its server silent, as above, and the others sent there are taken
elsewhere with it: its writes by the re-sent log, its reads sent again. A write
queued by write_behind that fails for good (fenced, no server left) fails the
next call that reads its reply, as BlockDevice's write-behind fails its next
drain. `pwrite` and `pread` return once their own requests are answered.

Queued writes (storage/pending.py). `write_behind` keeps the newest contiguous
run of its writes, up to PIECE bytes, unsent: a write that continues the run
joins it, and one that rewrites the run's tail (starts inside it and reaches its
end) cuts that tail off first, so it is never sent. The kernel splits a direct
write at the page edges of the user's buffer, and a writer's block that one
request ends inside is queued twice, once with its old bytes and once whole from
the next request: held here, each megabyte still goes out as one request, as an
aligned writer's does, with no write waiting for another of the same bytes. The
run goes out in PIECE-sized requests as it grows past PIECE, whole when a write
elsewhere comes, at `drain`, flush and close, and before a read or `pwrite` that
overlaps it; `read_newest` and `behind_pending` count it. It is not in the log
(nothing was sent), so a silence has nothing of it to re-send; the write guard
and refuse_writes are checked again when it goes (refused: dropped, and the call
that would have sent it fails).

Read-ahead. A sequential reader's next blocks (the filesystem asks with
`advise_willneed`, under the data locks that cover them, and drops them with
`forget_read_ahead` when those go) are read PIECE at a time, up to AHEAD_PIECES
requests side by side, so the next read finds its bytes here instead of waiting a
round trip (one synchronous 1 MiB request at a time was about 6 ms). From the event
loop and never waiting: nothing is sent while another thread holds the device, nor
over bytes a write not yet answered covers (queued, in flight, held, maybe in
flight: the server works on a connection's requests side by side, so a read sent
after a write could overtake it); a write of a piece's bytes makes it stale at once.
`data_ready` waits for a piece's reply in a worker thread; a read that fails there
is read again plainly. Pieces unused for AHEAD_UNUSED seconds go.

Requests carry this node's membership generation (`attach(view)`); a server
refuses writes from a node outside its view or from an older life of it.
Thread-safe: one lock; a call holds it while it sends and reads its replies.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import itertools
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import trio

from clusterfs import failover, workers
from clusterfs.config import ClusterConfig
from clusterfs.dlm.preferred import server_order
from clusterfs.errors import StorageError, WireError
from clusterfs.format.block import BLOCK_SIZE
from clusterfs.storage import blockwire as bw
from clusterfs.storage.device import BlockAddressed, WritesAtOnce, from_newest_write
from clusterfs.storage.pending import PendingRun
from clusterfs.wire import frame as wf
from clusterfs.wire.types import MsgType

log = logging.getLogger(__name__)

LOG_LIMIT = 64 << 20         # unflushed write bytes kept for a re-send; past it, flush
SILENT_FOR = 30.0            # a silent server is skipped this long (or to a new view)
REFUSED_WAIT = 4             # x io_timeout: how long to retry when every server refuses
LOOP_SHARE = 4               # a request sent on the event loop waits io_timeout / this
CLOCK_DRIFT = 1e-4           # how far two nodes' clocks may drift apart, s per s
WINDOW = 8                   # requests in flight per device, at most
AHEAD_PIECES = WINDOW // 2   # pieces read ahead (in flight, or in and unused), at most
AHEAD_WANTED = 64 << 20      # bytes asked to be read ahead and not sent yet, at most
AHEAD_RANGES = 256           # ... in at most this many ranges (a fragmented file's)
AHEAD_UNUSED = 2.0           # seconds a piece read ahead is kept unused (a reader gone)
PIECE = bw.MAX_IO             # larger reads and writes go in pieces of this, side by side
SETTLE_SHARE = 2             # x failure_timeout: how long a flush waits for a write
                             # maybe in flight to be settled (module doc)
SETTLE_POLL = 0.02           # seconds between looks while a flush waits for that
SCHEME = "proxy://"
FAILOVER_PHASE = "proxy re-target"    # clusterfs.failover: a silent server until re-targeted

View = tuple[int, frozenset[int]]          # (generation, members)
Locate = Callable[[int], bytes]            # byte offset -> key of its covering resource
UNMAPPED = b""                             # the key of every offset before route_by


class _Silent(Exception):
    """This server did not answer in time, broke the connection, or refused.
    `waited`: how long it had owed the answer (0: it refused, or the connection broke
    or was refused)."""

    def __init__(self, why: str, waited: float = 0.0) -> None:
        super().__init__(why)
        self.waited = waited


class _Lost(Exception):
    """The connection a request went out on was dropped before its reply came."""


class _Blocked(Exception):
    """A write may not be sent yet: an older one over its bytes may still land
    (module doc, "Maybe in flight"). It is held instead."""


@dataclasses.dataclass(eq=False)
class _Logged:
    """A write accepted since the last flush (the log), numbered in the order accepted."""

    offset: int
    data: bytes
    seq: int
    held: bool = False             # not sent yet: an older overlapping one may land

    def overlaps(self, offset: int, length: int) -> bool:
        return self.offset < offset + length and offset < self.offset + len(self.data)


@dataclasses.dataclass(eq=False)
class _Request:
    """A request sent and not answered yet."""

    server: int
    conn: _Connection
    mtype: int
    body: dict[str, Any]           # as sent, with its id
    offset: int
    length: int
    deadline: float
    wait: float                    # seconds from its send to `deadline`
    covered: bool = False          # a write its server's silence had re-sent (the log)
    reply: dict[str, Any] | None = None
    entry: _Logged | None = None   # a write's entry in the log

    @property
    def writes(self) -> bool:
        return self.mtype == MsgType.BLOCK_WRITE

    def overlaps(self, offset: int, length: int) -> bool:
        return self.offset < offset + length and offset < self.offset + self.length


@dataclasses.dataclass(eq=False)
class _Ahead:
    """A piece of file data read ahead (advise_willneed): its request (which says
    where), then its bytes."""

    req: _Request
    asked: float                   # monotonic time it was sent
    data: bytes | None = None
    # a write over it, a forget, or a failed read: never used again (a flag on the
    # piece itself, which no rebinding of the list by another thread can undo)
    stale: bool = False

    def overlaps(self, offset: int, length: int) -> bool:
        return self.req.overlaps(offset, length)

    def covers(self, offset: int, length: int) -> bool:
        r = self.req
        return not self.stale and r.offset <= offset and offset + length <= r.offset + r.length


class _Connection:
    """One authenticated connection to one block server (blocking socket), with
    several requests in flight: each is sent at once, and its reply is read when
    asked for (`reply`), replies to the others read meanwhile being kept by id."""

    def __init__(self, cfg: ClusterConfig, me: int, server: int, timeout: float) -> None:
        self.server = server
        host, port = cfg.block_server(server)
        try:
            self.sock = socket.create_connection((host, port), timeout=timeout)
        except OSError as exc:
            raise _Silent(f"cannot connect to block server {server} at {host}:{port}: "
                          f"{exc.strerror or exc}",
                          timeout if isinstance(exc, TimeoutError) else 0.0) from exc
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray()
        self.me = me
        self.out, self.inb = bw.Sequencer(), bw.Sequencer()
        self.waiting: set[int] = set()             # ids sent, reply not read yet
        self.arrived: dict[int, dict[str, Any]] = {}   # replies read, not asked for yet
        # writes sent and not answered: id -> (offset, length, seq). After a silence
        # they are maybe in flight on the server (module doc)
        self.writes: dict[int, tuple[int, int, int]] = {}
        self.newest_gen = 0           # the newest generation a write here carried
        self.left_seen = False        # its server's leaving the view was logged
        self.since = 0.0              # when it was half-closed (linger)
        self.broken = False           # its frames can no longer be read (lingering)
        # a lower bound of (the server's clock - ours), from the clock its HELLO and
        # replies carry (blockwire): a write's start deadline `by` is mapped with it
        self.offset = float("-inf")
        self.offset_at = 0.0
        try:
            self.skey = self._handshake(cfg, time.monotonic() + timeout)
        except BaseException:
            self.close()
            raise

    def _handshake(self, cfg: ClusterConfig, deadline: float) -> bytes:
        nc = bw.new_nonce()
        self._send(wf.encode_prefixed(cfg.key, MsgType.HELLO, self.me, 0, 0,
                                      bw.hello(cfg.name, self.server, nc)), deadline)
        f = wf.decode(cfg.key, self._recv(deadline), max_frame=bw.MAX_FRAME)
        if f.sender != self.server:
            raise WireError(f"block HELLO from node {f.sender}, not {self.server}")
        ns = bw.check_hello(f, cfg.name, self.me, echo=nc)
        self._clock(f.body)
        return wf.session_key(cfg.key, self.me, self.server, nc, ns)

    def _clock(self, body: Any) -> None:
        """A frame just read says the server's clock read `t` when it sent it: so now
        (ours) its clock reads at least `t`. Keep the largest such bound, letting the
        older ones sag by CLOCK_DRIFT of the time since (clocks run at rates that
        differ slightly)."""
        t = bw.clock(body)
        if t is None:
            return
        now = time.monotonic()
        sagged = self.offset - CLOCK_DRIFT * (now - self.offset_at)
        self.offset, self.offset_at = max(sagged, t - now), now

    def server_time(self, ours: float) -> float | None:
        """Our clock's `ours` on the server's clock, at the earliest (None if this
        server never said its clock: a server before `by`, which then has only
        its own lease)."""
        if self.offset == float("-inf"):
            return None
        return ours + self.offset - CLOCK_DRIFT * (time.monotonic() - self.offset_at)

    def send(self, mtype: int, generation: int, body: dict[str, Any], deadline: float,
             wait: float, seq: int = 0) -> None:
        """Send one request (its reply is read by `reply(body["id"], ...)`), which we
        wait `wait` seconds for, until `deadline`. A write may start on the server no
        later than halfway there (its `by`, on the server's clock: blockwire); `seq`
        is its number in the log."""
        if mtype == MsgType.BLOCK_WRITE:
            by = self.server_time(deadline - wait / 2)
            if by is not None:
                body = {**body, "by": by}
            self.writes[body["id"]] = (body["off"], len(body["data"]), seq)
            self.newest_gen = max(self.newest_gen, generation)
        self.waiting.add(body["id"])
        self._send(wf.encode_prefixed(self.skey, mtype, self.me, generation,
                                      self.out.take(), body), deadline)

    def reply(self, rid: int, deadline: float) -> dict[str, Any]:
        """The reply to request `rid`, reading the others' as they come first."""
        while rid not in self.arrived:
            self._take(self._recv(deadline))
        return self.arrived.pop(rid)

    def _take(self, data: bytes) -> None:
        """Check one frame read and keep the reply it carries."""
        f = wf.decode(self.skey, data, max_frame=bw.MAX_FRAME)
        self.inb.check(f, self.server)
        body = f.body
        self._clock(body)
        got = body.get("id") if isinstance(body, dict) else None
        if f.type != MsgType.BLOCK_REPLY or got not in self.waiting:
            raise WireError(f"block server {self.server}: a reply to no request of ours")
        self.waiting.discard(got)
        self.writes.pop(got, None)        # answered: the server is done with it
        self.arrived[got] = body

    def request(self, mtype: int, generation: int, body: dict[str, Any],
                timeout: float, seq: int = 0) -> dict[str, Any]:
        """One request and its reply."""
        deadline = time.monotonic() + timeout
        self.send(mtype, generation, body, deadline, timeout, seq)
        return self.reply(body["id"], deadline)

    def linger(self) -> None:
        """Send nothing more here, but keep reading: writes sent here are maybe in
        flight until answered, or until the server closes its end, which it does
        only once every request it read is done (module doc). Half-closing tells it
        that no more requests come."""
        self.since = time.monotonic()
        self.arrived.clear()
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass                          # already gone: reading says so

    def settled(self) -> bool:
        """Whether no write sent here can land any more: each answered, or the
        server closed the connection (after its I/O). Reads what has come; never
        waits. A connection whose frames cannot be read any more (forged, out of
        sequence) settles nothing: the view has to."""
        if self.broken:
            return False
        try:
            self.sock.setblocking(False)
            while self.writes:
                data = self._frame()
                if data is not None:
                    self._take(data)
                    continue
                chunk = self.sock.recv(1 << 16)
                if not chunk:
                    return True           # closed by the server, its I/O done
                self.buf += chunk
        except BlockingIOError:
            return False
        except ConnectionError:
            return True                   # reset: the server's socket is gone
        except (OSError, WireError) as exc:
            log.warning("block server %d: cannot read the replies to writes that may "
                        "still land: %s", self.server, exc)
            self.broken = True
            return False
        return True

    def _send(self, data: bytes, deadline: float) -> None:
        self.sock.settimeout(max(0.001, deadline - time.monotonic()))
        self.sock.sendall(data)

    def _recv(self, deadline: float) -> bytes:
        head = wf.LENGTH.size
        self._fill(head, deadline)
        (n,) = wf.LENGTH.unpack_from(self.buf)
        wf.check_length(n, bw.MAX_FRAME)
        self._fill(head + n, deadline)
        data = self._frame()
        assert data is not None
        return data

    def _frame(self) -> bytes | None:
        """The first whole frame read, taken from the buffer; None if none is."""
        return wf.take_frame(self.buf, bw.MAX_FRAME)

    def _fill(self, n: int, deadline: float) -> None:
        while len(self.buf) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("timed out")
            self.sock.settimeout(left)
            chunk = self.sock.recv(max(n - len(self.buf), 1 << 16))
            if not chunk:
                raise ConnectionError("connection closed by the server")
            self.buf += chunk

    def close(self) -> None:
        self.sock.close()


class ProxyDevice(WritesAtOnce, BlockAddressed):
    """The shared disk through the storage group's block servers."""

    def __init__(self, config: ClusterConfig, node_id: int, *, name: str | None = None,
                 io_timeout: float | None = None) -> None:
        if not config.storage_group or not config.block_servers:
            raise StorageError("proxy I/O needs [storage] group and servers in the config")
        self.cfg = config
        self.node_id = node_id
        self.path = name or f"{SCHEME}{config.name}"
        self.fd = None
        self.proxied = True
        self.io_timeout = io_timeout if io_timeout is not None else config.io_timeout
        # what a request sent on an event loop's thread waits (module doc)
        self.loop_timeout = self.io_timeout / LOOP_SHARE
        # on_silent(server, waited): it did not answer a request it owed for `waited` s
        # (0: it refused, or its connection broke)
        self.on_silent: Callable[[int, float], None] | None = None
        self.on_fenced: Callable[[str], None] | None = None     # a server says: fenced
        self._view: Callable[[], View] | None = None
        self._locate: Locate | None = None
        self._preferred: dict[bytes, int] = {}             # resource key -> named server
        self._preferred_gen = 0                            # view it was last pruned for
        self._retarget_pending = False                     # a server went silent since
        self._lock = threading.RLock()
        self._settling = threading.Condition(self._lock)  # a flush's wait releases the lock
        self._conns: dict[int, _Connection] = {}
        self._silent: dict[int, tuple[float, int]] = {}    # server -> (until, generation)
        self._log: list[_Logged] = []
        self._log_bytes = 0
        self._seq = 0                                      # the last write's number
        # half-closed connections whose writes are maybe in flight (module doc), and
        # the writes held until those are settled, in their order
        self._lingering: list[_Connection] = []
        self._held: list[_Logged] = []
        self.settle_timeout = SETTLE_SHARE * config.failure_timeout
        self._unflushed: set[int] = set()                  # servers written since flush
        # server -> the newest view whose fence of it completed (server_fenced)
        self._fenced_in: dict[int, int] = {}
        self._inflight: collections.deque[_Request] = collections.deque()   # sent order
        self._inflight_written = 0                         # bytes of writes among them
        self._pending = PendingRun()                       # write_behind's, not sent yet
        # read-ahead ("Read-ahead" in the module doc): pieces asked, and what the reader
        # will want next, not asked yet ((offset, end) ranges, in order). Both are
        # rebound, never changed in place, so the event loop reads them without the lock
        self._ahead: list[_Ahead] = []
        self._wanted: list[tuple[int, int]] = []
        self._refused: str | None = None
        self._ids = 0
        self.stats = {"reads": 0, "writes": 0, "flushes": 0, "requests": 0,
                      "timeouts": 0, "retargets": 0, "resent": 0, "refusals": 0,
                      "to_named": 0, "to_computed": 0, "pipelined": 0, "most_in_flight": 0,
                      "maybe_in_flight": 0, "held": 0, "joined": 0, "superseded": 0,
                      "read_ahead": 0, "read_ahead_used": 0}
        self.per_server: dict[int, int] = {}               # requests answered
        self.written: dict[int, int] = {}                  # bytes written, by server
        self.retarget_times: list[float] = []              # wall clock of each re-target
        self.size = self._info()
        self.blocks = self.size // BLOCK_SIZE

    def attach(self, view: Callable[[], View]) -> None:
        """From now on requests carry view()'s generation, and go to its members."""
        self._view = view

    def route_by(self, locate: Locate) -> None:
        """From now on an I/O at offset o is routed by the resource `locate(o)`."""
        self._locate = locate

    def prefer(self, key: bytes, server: int) -> None:
        """A grant of resource `key` named `server` (any thread)."""
        self._preferred[key] = server

    def server_fenced(self, nodes: Iterable[int], generation: int) -> None:
        """The survivors' fence of `nodes`, removed in view `generation` or earlier,
        is done (membership's Fenced; any thread, never waits): the writes they took
        before that view can no longer land (module doc, "Maybe in flight")."""
        for n in nodes:
            if generation > self._fenced_in.get(n, 0):
                self._fenced_in[n] = generation

    # -- routing ---------------------------------------------------------------------
    def _current(self) -> View:
        if self._view is None:
            return 0, frozenset(self.cfg.storage_group)
        return self._view()

    def _candidates(self, offset: int) -> list[int]:
        """Live servers, the preferred one for `offset` first, the rest in the order
        of its resource."""
        generation, members = self._current()
        now = time.monotonic()
        live = []
        for s in sorted(set(self.cfg.storage_group) & members):
            until, gen = self._silent.get(s, (0.0, 0))
            if now < until and gen == generation:
                continue
            live.append(s)
        if not live:
            return []
        if generation != self._preferred_gen:
            self._prune_preferred(generation, members)
        key = self._locate(offset) if self._locate is not None else UNMAPPED
        order = server_order(key, live)
        named = self._preferred.get(key)
        if named in live:
            self.stats["to_named"] += 1
            order.remove(named)
            return [named, *order]
        self.stats["to_computed"] += 1
        return order

    def _prune_preferred(self, generation: int, members: frozenset[int]) -> None:
        """A new view: forget what grants named of servers that are no longer in it
        (held locks are named again by their masters; the rest when next granted)."""
        self._preferred_gen = generation
        for key, server in list(self._preferred.items()):
            if server not in members:
                self._preferred.pop(key, None)

    def _call(self, mtype: int, body: dict[str, Any], offset: int,
              entry: _Logged | None = None) -> tuple[int, dict[str, Any]]:
        """Send one request to the first live server that answers: (server, reply).
        When every server failed, try them all again for up to REFUSED_WAIT x
        io_timeout (views changing, a server in quarantine) before giving up.
        A write (`entry`) that a silence meanwhile put behind a write maybe in
        flight raises _Blocked."""
        errors: list[str] = []
        deadline = time.monotonic() + REFUSED_WAIT * self.io_timeout
        seq = entry.seq if entry is not None else 0
        while True:
            order = self._candidates(offset)
            if not order and self._silent and time.monotonic() <= deadline:
                self._silent.clear()          # every server silent: try them all again
                continue
            for server in order:
                if entry is not None and self._must_wait(entry):
                    raise _Blocked
                try:
                    reply = self._send_to(server, mtype, body, seq)
                except _Silent as exc:
                    errors.append(str(exc))
                    self._mark_silent(server, exc)
                    continue
                return server, reply
            if time.monotonic() > deadline:
                break
            time.sleep(0.1)
            self._silent.clear()
        why = "; ".join(errors[-3:]) or "none live"
        raise StorageError(f"{self.path}: no block server left ({why})")

    def _send_to(self, server: int, mtype: int, body: dict[str, Any], seq: int = 0
                 ) -> dict[str, Any]:
        """One request to `server`, and its reply (nothing else is sent meanwhile)."""
        self._ids += 1
        body = {**body, "id": self._ids}
        generation = self._current()[0]
        wait = self._wait()
        self.stats["requests"] += 1
        try:
            reply = self._exchange(server, mtype, generation, body, wait, seq)
        except TimeoutError as exc:
            self.stats["timeouts"] += 1
            self._drop(server)
            raise _Silent(f"block server {server}: no answer within {wait:g} s",
                          wait) from exc
        except (OSError, WireError) as exc:
            self._drop(server)
            raise _Silent(f"block server {server}: {exc}") from exc
        except _Silent:
            self._drop(server)
            raise
        return self._accepted(server, mtype, reply)

    def _accepted(self, server: int, mtype: int, reply: dict[str, Any]) -> dict[str, Any]:
        """`reply` if the server carried the request out; _Silent if it refused (or
        StorageError if it says this node was fenced)."""
        if not reply.get("ok"):
            self.stats["refusals"] += 1
            if reply.get("fenced"):
                self._fenced(str(reply.get("error")))
            raise _Silent(f"block server {server} refused: {reply.get('error')}")
        self.per_server[server] = self.per_server.get(server, 0) + 1
        if self._retarget_pending:      # the first answer since a server went silent
            self._retarget_pending = False
            self._retargeted(server, mtype)
        return reply

    def _fenced(self, reason: str) -> None:
        """The cluster fenced this node at its servers (it has no disk path of its
        own): final, as a reservation conflict is; no other server is tried."""
        self._refused = f"fenced: {reason}"
        if self.on_fenced is not None:
            self.on_fenced(reason)
        raise StorageError(f"{self.path}: {reason}")

    def _exchange(self, server: int, mtype: int, generation: int, body: dict[str, Any],
                  wait: float, seq: int) -> dict[str, Any]:
        conn = self._conns.get(server)
        if conn is not None:
            try:
                return conn.request(mtype, generation, body, wait, seq)
            except ConnectionError:
                # a connection made earlier was closed under us (the server restarted,
                # or dropped it): no silence yet. Once more on a new one (a request
                # is idempotent, and nothing else was sent meanwhile)
                self._drop(server)
        conn = self._connection(server, wait)
        return conn.request(mtype, generation, body, wait, seq)

    def _drop(self, server: int) -> None:
        """Use `server`'s connection no more. Writes it took and did not answer are
        maybe in flight there: it lingers until they are settled (module doc)."""
        conn = self._conns.pop(server, None)
        if conn is None:
            return
        if not conn.writes:
            conn.close()
            return
        conn.linger()
        self._lingering.append(conn)
        self.stats["maybe_in_flight"] += len(conn.writes)
        log.info("node %d: %d write(s) maybe still under way on block server %d: newer "
                 "writes of their bytes wait until it answers, closes or is fenced",
                 self.node_id, len(conn.writes), server)

    def _mark_silent(self, server: int, exc: _Silent) -> None:
        failover.enter(FAILOVER_PHASE)
        generation = self._current()[0]
        self._silent[server] = (time.monotonic() + SILENT_FOR, generation)
        self._retarget_pending = True
        log.warning("node %d gen %d: %s; re-targeting to another server of the storage "
                    "group", self.node_id, generation, exc)
        self._drop(server)       # its reads in flight are sent again elsewhere
        self._cover(server)
        if self.on_silent is not None:
            self.on_silent(server, exc.waited)
        if server in self._unflushed:
            self._unflushed.discard(server)
            self._resend_log()

    def _retargeted(self, server: int, mtype: int) -> None:
        self.stats["retargets"] += 1
        self.retarget_times.append(time.time())
        log.warning("node %d: %s re-targeted to block server %d", self.node_id,
                    MsgType(mtype).name, server)
        failover.leave(FAILOVER_PHASE)

    def _resend_log(self) -> None:
        """A server that took writes not yet flushed went silent: send every write
        since the last flush again, in order (the others' too: the same final state).
        The held ones go when released."""
        for entry in list(self._log):
            if not entry.held:
                self._put(entry)
                self.stats["resent"] += 1

    # -- writes maybe in flight (module doc) ---------------------------------------------
    def _must_wait(self, entry: _Logged) -> bool:
        """Whether an older write over `entry`'s bytes may still land after it: one
        maybe in flight on a silent server, or one held. Free when there is none."""
        if not self._lingering and not self._held:
            return False
        offset, length = entry.offset, len(entry.data)
        for conn in self._lingering:
            for off, n, seq in conn.writes.values():
                if seq < entry.seq and off < offset + length and offset < off + n:
                    return True
        return any(h.seq < entry.seq and h.overlaps(offset, length) for h in self._held)

    def _put(self, entry: _Logged) -> int | None:
        """Write `entry` through the first server that takes it, waiting for its
        answer: that server. None if it is held instead (an older write over its
        bytes may still land)."""
        if self._must_wait(entry):
            self._hold(entry)
            return None
        try:
            server, _ = self._call(MsgType.BLOCK_WRITE,
                                   {"off": entry.offset, "data": entry.data},
                                   entry.offset, entry)
        except _Blocked:
            self._hold(entry)
            return None
        self._unflushed.add(server)
        return server

    def _hold(self, entry: _Logged) -> None:
        """Hold `entry` until _settle sends it: in `_held` once (held is True exactly
        while it is there). Once only: a put that finds its server silent re-sends
        the log (_mark_silent), and that re-send may hold this very entry before the
        put itself finds it blocked; held twice, _settle sent one and left the other
        behind as not held, blocking every newer write of its bytes, and the flush,
        for good."""
        if entry.held:
            return
        entry.held = True
        bisect.insort(self._held, entry, key=lambda e: e.seq)
        self.stats["held"] += 1

    def _settle(self) -> None:
        """Forget the writes maybe in flight that no longer are (answered, connection
        closed by the server, server fenced), then send the held writes
        that nothing older blocks any more. Never waits for a slow server."""
        if not self._lingering and not self._held:
            return
        if self._lingering:
            members = self._current()[1]
            for conn in list(self._lingering):
                how = self._settled_how(conn, members)
                if how is not None:
                    self._lingering.remove(conn)
                    conn.close()
                    log.info("node %d: block server %d %s: its writes can no longer "
                             "land late", self.node_id, conn.server, how)
        for entry in list(self._held):
            if entry.held and not self._must_wait(entry):
                self._held.remove(entry)
                entry.held = False
                server = self._put(entry)
                if server is not None:
                    self.written[server] = self.written.get(server, 0) + len(entry.data)

    def _settled_how(self, conn: _Connection, members: frozenset[int]) -> str | None:
        """How `conn`'s writes maybe in flight were settled, or None if they were not:
        its server answered them or closed the connection, or was fenced in a view
        after the last one they went out in. Out of the view and not fenced yet is
        not settled (module doc): that is logged once."""
        if self._fenced_in.get(conn.server, 0) > conn.newest_gen:
            return f"was fenced (view {self._fenced_in[conn.server]})"
        if conn.settled():
            return "answered or closed"
        if conn.server not in members and not conn.left_seen:
            conn.left_seen = True
            log.info("node %d: block server %d left the view with %d write(s) maybe "
                     "under way: newer writes of their bytes wait for its fence",
                     self.node_id, conn.server, len(conn.writes))
        return None

    def _await_settled(self) -> None:
        """(Under the lock.) Wait until no write is maybe in flight or held, letting
        go of the lock between looks (the event loop's calls hold their writes
        meanwhile rather than wait). StorageError if a server has owed that for
        settle_timeout."""
        started = time.monotonic()
        while True:
            self._settle()
            if not self._lingering and not self._held:
                return
            since = min([started, *(c.since for c in self._lingering)])
            if time.monotonic() - since > self.settle_timeout:
                raise StorageError(self._unsettled_error())
            self._settling.wait(SETTLE_POLL)

    def _unsettled_error(self) -> str:
        servers = sorted({c.server for c in self._lingering})
        return (f"{self.path}: block server(s) {servers} took writes and neither answered "
                f"them, nor closed the connection, nor were fenced within "
                f"{self.settle_timeout:g} s: they may still land, so newer writes of "
                f"those bytes cannot be ordered after them")

    def _quiesce(self) -> None:
        """(Under the lock.) Every write sent answered, none maybe in flight or held."""
        while True:
            self._finish_all()
            self._await_settled()
            if not self._inflight:
                return

    def _with_held(self, offset: int, data: bytes) -> bytes:
        """`data` read at `offset`, with the held writes over it laid on, in order."""
        if not self._held:
            return data
        out = bytearray(data)
        for h in self._held:
            if h.overlaps(offset, len(out)):
                lo, hi = max(h.offset, offset), min(h.offset + len(h.data), offset + len(out))
                out[lo - offset : hi - offset] = h.data[lo - h.offset : hi - h.offset]
        return bytes(out)

    # -- several requests in flight ----------------------------------------------------
    def _start(self, mtype: int, body: dict[str, Any], offset: int, length: int,
               entry: _Logged | None = None) -> _Request | None:
        """Send a request to the first live server of `offset`'s order that takes it,
        once the window has room and nothing in flight overlaps it; None if none
        did (the caller then goes through _call, which waits for servers). A write
        (`entry`) put behind one maybe in flight meanwhile raises _Blocked."""
        self._make_room(offset, length)
        for server in self._candidates(offset):
            if entry is not None and self._must_wait(entry):
                raise _Blocked
            try:
                req = self._submit(server, mtype, body, offset, length, entry)
            except _Silent as exc:
                self._mark_silent(server, exc)
                continue
            self._inflight.append(req)
            if req.writes:
                self._inflight_written += req.length
            self.stats["pipelined"] += 1
            self.stats["most_in_flight"] = max(self.stats["most_in_flight"],
                                               len(self._inflight))
            return req
        return None

    def _make_room(self, offset: int, length: int) -> None:
        """Read the replies of every write in flight that overlaps [offset, +length)
        (and of all sent before it: the order is kept), then of the oldest requests
        until the window has room."""
        last = None
        for req in self._inflight:
            if req.writes and req.overlaps(offset, length):
                last = req
        while last is not None and last in self._inflight:
            self._finish(self._inflight[0])
        while len(self._inflight) >= WINDOW:
            self._finish(self._inflight[0])

    def _submit(self, server: int, mtype: int, body: dict[str, Any], offset: int,
                length: int, entry: _Logged | None = None) -> _Request:
        self._ids += 1
        body = {**body, "id": self._ids}
        generation = self._current()[0]
        wait = self._wait()
        deadline = time.monotonic() + wait
        self.stats["requests"] += 1
        for attempt in (1, 2):
            try:
                conn = self._connection(server, wait)
                conn.send(mtype, generation, body, deadline, wait,
                          entry.seq if entry is not None else 0)
            except ConnectionError as exc:
                # closed under us (the server restarted): once more on a new one
                self._drop(server)
                if attempt == 2:
                    raise _Silent(f"block server {server}: {exc}") from exc
                continue
            except TimeoutError as exc:
                self.stats["timeouts"] += 1
                self._drop(server)
                raise _Silent(f"block server {server}: no answer within {wait:g} s",
                              wait) from exc
            except (OSError, WireError) as exc:
                self._drop(server)
                raise _Silent(f"block server {server}: {exc}") from exc
            if mtype == MsgType.BLOCK_WRITE:
                self._unflushed.add(server)     # its silence re-sends the log from now
            return _Request(server, conn, mtype, body, offset, length, deadline, wait,
                            entry=entry)
        raise AssertionError("unreachable")

    def _connection(self, server: int, wait: float) -> _Connection:
        conn = self._conns.get(server)
        if conn is None:
            conn = self._conns[server] = _Connection(self.cfg, self.node_id, server, wait)
        return conn

    def _wait(self) -> float:
        """How long a request sent now waits for its reply: io_timeout, or
        loop_timeout on an event loop's thread (module doc)."""
        return self.loop_timeout if _on_event_loop() else self.io_timeout

    def _finish(self, req: _Request) -> dict[str, Any]:
        """The reply to `req`, read once. Its server silent: a write is covered by
        the log re-sent (_mark_silent), a read is sent again elsewhere; its
        connection dropped for another reason (closed under us): sent again."""
        if req.reply is not None:
            return req.reply
        self._forget(req)
        try:
            req.reply = self._accepted(req.server, req.mtype, self._read_reply(req))
        except _Lost:
            req.reply = {} if req.covered else self._again(req)
        except _Silent as exc:
            # a write sent there is in the log its silence re-sends (_mark_silent)
            req.covered = req.writes and req.server in self._unflushed
            self._mark_silent(req.server, exc)
            req.reply = {} if req.covered else self._again(req)
        return req.reply

    def _read_reply(self, req: _Request) -> dict[str, Any]:
        if req.covered or self._conns.get(req.server) is not req.conn:
            raise _Lost
        try:
            return req.conn.reply(req.body["id"], req.deadline)
        except TimeoutError as exc:
            self.stats["timeouts"] += 1
            self._drop(req.server)
            raise _Silent(f"block server {req.server}: no answer within "
                          f"{req.wait:g} s", req.wait) from exc
        except (OSError, WireError) as exc:
            self._drop(req.server)
            raise _Silent(f"block server {req.server}: {exc}") from exc

    def _again(self, req: _Request) -> dict[str, Any]:
        """Send a request whose first try was lost once more, waiting for it."""
        if req.entry is not None:
            self._put(req.entry)             # a write: unless held
            return {}
        body = {k: v for k, v in req.body.items() if k != "id"}
        server, reply = self._call(req.mtype, body, req.offset)
        if req.writes:
            self._unflushed.add(server)
        return reply

    def _cover(self, server: int) -> None:
        """`server` went silent: its writes in flight are re-sent with the log (they
        are in it), so nothing waits for their replies any more."""
        for req in list(self._inflight):
            if req.server == server and req.writes:
                req.covered = True
                self._forget(req)

    def _forget(self, req: _Request) -> None:
        """`req` no longer counts in the window."""
        if req in self._inflight:
            self._inflight.remove(req)
            if req.writes:
                self._inflight_written -= req.length

    def _finish_all(self) -> None:
        while self._inflight:
            self._finish(self._inflight[0])

    # -- the device interface --------------------------------------------------------
    def _info(self) -> int:
        _server, reply = self._call(MsgType.BLOCK_INFO, {}, 0)
        size = reply.get("size")
        if not isinstance(size, int):
            raise StorageError(f"{self.path}: block server sent no size")
        return size

    def pread(self, offset: int, length: int) -> bytes:
        end = min(offset + length, self.size)
        with self._lock:
            self.stats["reads"] += 1
            self._settle()
            self._send_overlapping(offset, end - offset)
            if end - offset <= PIECE:
                return self._with_held(offset, self._read_one(offset, end - offset))
            pieces = [self._read_started(at, min(PIECE, end - at))
                      for at in range(offset, end, PIECE)]
            data = b"".join(self._read_finished(*piece) for piece in pieces)
            return self._with_held(offset, data)

    def read_newest(self, blkno: int) -> bytes:
        """One block as this node last wrote it: from the queued run or the re-send log
        when the newest write of it there holds it whole (a writer whose requests end
        inside a block reads that block back at its next request: no round trip, and
        no wait for that write's reply), else from a server."""
        copy = self.queued_copy(blkno)
        return copy if copy is not None else self.read(blkno)

    def queued_copy(self, blkno: int, wait: bool = True) -> bytes | None:
        """The block as the newest write of it in the queued run or the re-send log
        holds it whole; None when none does, or (`wait` False) when another thread
        holds the device (a drain or flush waiting on a server: the caller reads the
        block in a worker thread rather than wait on its event loop)."""
        if not self._lock.acquire(blocking=wait):
            return None
        try:
            newest_first = itertools.chain(self._pending.newest_first(),
                                           ((e.offset, e.data) for e in reversed(self._log)))
            return from_newest_write(newest_first, blkno * BLOCK_SIZE, BLOCK_SIZE)
        finally:
            self._lock.release()

    def _read_one(self, offset: int, length: int) -> bytes:
        """One request, answered before anything else is sent."""
        self._make_room(offset, length)
        _server, reply = self._call(MsgType.BLOCK_READ, {"off": offset, "len": length},
                                    offset)
        return self._read_data(reply, offset, length)

    def _read_started(self, offset: int, length: int
                      ) -> tuple[_Request | None, int, int]:
        return (self._start(MsgType.BLOCK_READ, {"off": offset, "len": length}, offset,
                            length), offset, length)

    def _read_finished(self, req: _Request | None, offset: int, length: int) -> bytes:
        if req is None:                    # no server took it when it was sent
            return self._read_one(offset, length)
        return self._read_data(self._finish(req), offset, length)

    def _read_data(self, reply: dict[str, Any], offset: int, length: int) -> bytes:
        data = reply.get("data")
        if not isinstance(data, bytes) or len(data) != length:
            raise StorageError(f"{self.path}: short read at {offset}")
        return data

    def read_data(self, offset: int, length: int) -> bytes:
        """File data: from a piece read ahead that holds it (data_ready said so), else
        a plain pread. Pieces the reader has passed are let go, and more are asked."""
        piece = next((a for a in self._ahead if a.data is not None
                      and a.covers(offset, length)), None)
        if piece is None or piece.data is None:
            return self.pread(offset, length)
        self.stats["read_ahead_used"] += 1
        req = piece.req
        at = offset - req.offset
        data = piece.data[at : at + length] if at or length != req.length else piece.data
        if offset + length == req.offset + req.length:
            piece.stale = True               # read to its end: let it go
        self._top_up()
        return data

    # -- read-ahead ------------------------------------------------------------------------
    def advise_willneed(self, blkno: int, count: int) -> None:
        """A sequential reader will want these blocks: keep up to AHEAD_PIECES pieces of
        them on their way (module doc, "Read-ahead"). From the event loop: never waits."""
        offset = blkno * BLOCK_SIZE
        end = min(offset + count * BLOCK_SIZE, self.size)
        if offset >= end:
            return
        wanted = [*self._wanted, (offset, end)][-AHEAD_RANGES:]
        while sum(e - o for o, e in wanted) > AHEAD_WANTED:
            wanted.pop(0)                    # the oldest wishes go first
        self._wanted = wanted
        self._top_up()

    def forget_read_ahead(self) -> None:
        """Drop every piece read ahead and every wish (another node may change what
        they hold). Their requests still in flight are answered into nothing."""
        for piece in self._ahead:
            piece.stale = True
        self._ahead = []
        self._wanted = []

    async def data_ready(self, offset: int, length: int) -> bool:
        """Make a read_data() of the range answerable at once: True when a piece read
        ahead holds it (its reply waited for in a worker thread, the event loop free),
        False when none does or its read failed (read it with read_async then)."""
        piece = next((a for a in self._ahead if a.covers(offset, length)), None)
        if piece is None:
            return False
        if piece.data is None:
            await workers.run(self._take_ahead, piece)
        return piece.data is not None and not piece.stale

    def _take_ahead(self, piece: _Ahead) -> None:
        """(A worker thread.) The reply to a piece read ahead: its bytes, or the piece
        given up if the read failed for good (the reader reads it plainly and is told)."""
        with self._lock:
            if piece.stale or piece.data is not None:
                return
            try:
                piece.data = self._read_finished(piece.req, piece.req.offset,
                                                 piece.req.length)
            except StorageError:
                piece.stale = True

    def _top_up(self) -> None:
        """Send wished-for pieces while fewer than AHEAD_PIECES are out. Never waits:
        nothing while another thread holds the device; a piece goes only where no
        write not yet answered lies (queued, in flight, held or maybe in flight: the
        server works on a connection's requests side by side, so the read could
        overtake it); one that cannot go now is given up, and read plainly if wanted."""
        if not self._wanted or not self._lock.acquire(blocking=False):
            return
        try:
            if self._lingering or self._held or self._refused is not None:
                self._wanted = []
                return
            now = time.monotonic()
            for piece in self._ahead:
                if now - piece.asked > AHEAD_UNUSED:
                    piece.stale = True       # its reader went elsewhere
            ahead = [a for a in self._ahead if not a.stale]
            wanted = list(self._wanted)
            while wanted and len(ahead) < AHEAD_PIECES and len(self._inflight) < WINDOW:
                offset, end = wanted[0]
                n = min(PIECE, end - offset)
                wanted[0] = (offset + n, end)
                if offset + n >= end:
                    wanted.pop(0)
                if any(a.overlaps(offset, n) for a in ahead) or self._unanswered(offset, n):
                    continue
                try:
                    req = self._start(MsgType.BLOCK_READ, {"off": offset, "len": n},
                                      offset, n)
                except StorageError:
                    req = None
                if req is None:
                    wanted = []                 # no server takes it: plain reads will say
                    break
                self.stats["read_ahead"] += 1
                ahead.append(_Ahead(req, now))
            self._ahead, self._wanted = ahead, wanted
        finally:
            self._lock.release()

    def _unanswered(self, offset: int, length: int) -> bool:
        """Whether a write of these bytes is queued or in flight here."""
        return self._pending.overlaps(offset, length) or any(
            r.writes and r.overlaps(offset, length) for r in self._inflight)

    def _drop_ahead(self, offset: int, length: int) -> None:
        """A write of these bytes: the pieces read ahead over them are old."""
        for piece in self._ahead:
            if piece.overlaps(offset, length):
                piece.stale = True

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write, and return once the servers took it (every piece answered)."""
        self._check_writable(offset, len(data))
        raw = bytes(data)
        with self._lock:
            self.stats["writes"] += 1
            self._drop_ahead(offset, len(raw))
            self._settle()
            self._send_overlapping(offset, len(raw))
            if len(raw) <= PIECE:
                self._make_room(offset, len(raw))
                self._write_piece(offset, raw)
                return
            sent = [self._write_started(offset + at, raw[at : at + PIECE])
                    for at in range(0, len(raw), PIECE)]
            for req in sent:
                if req is not None:
                    self._finish(req)

    def write_behind(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Queue the write and return: it joins the queued run (module doc, "Queued
        writes"), which is sent in requests of PIECE bytes as it grows past that; the
        replies are read later. `data` must not change afterwards."""
        self._check_writable(offset, len(data))
        view = memoryview(data).cast("B")
        with self._lock:
            self.stats["writes"] += 1
            self._drop_ahead(offset, len(view))
            self._settle()
            if not view:
                return
            if not self._pending.joins(offset, len(view)):
                self._send_pending()             # elsewhere: the run goes as it is
            elif self._pending.length:
                self.stats["joined"] += 1
            self.stats["superseded"] += self._pending.add(offset, view)
            self._send_pending(keep=PIECE)

    def _check_writable(self, offset: int, length: int) -> None:
        if self._refused is not None:
            raise StorageError(f"{self.path}: write at {offset}: {self._refused}")
        self._guard()
        if offset < 0 or offset + length > self.size:
            raise StorageError(f"{self.path}: write at {offset}: beyond the end of the "
                               f"device ({self.size} bytes)")

    def _send_pending(self, keep: int = 0) -> None:
        """Send the queued run from its start, in pieces of PIECE bytes, until at most
        `keep` bytes of it are left (the next write may still rewrite those). Refused
        writes (refuse_writes) are dropped, not sent: StorageError."""
        if self._pending.length <= keep:
            return
        if self._refused is not None:
            offset = self._pending.start
            self._pending.clear()
            raise StorageError(f"{self.path}: write at {offset}: {self._refused}")
        self._guard()              # queued a while ago, maybe: no write after a pill
        while self._pending.length > keep:
            if not self._log_has_room(min(PIECE, self._pending.length)):
                # flush with the run still whole: the flush lets go of the lock while
                # it waits, and a write queued meanwhile may change the run (bytes
                # taken off it first would then be logged, and sent, after newer ones)
                self._flush_locked()
                continue
            self._write_started(*self._pending.take(PIECE))

    def _send_overlapping(self, offset: int, length: int) -> None:
        """Send the queued run if it overlaps [offset, offset + length): a read or
        write of those bytes comes after it."""
        if self._pending.overlaps(offset, length):
            self._send_pending()

    def _logged(self, offset: int, piece: bytes) -> _Logged:
        """Keep `piece` for a re-send until the next flush, numbered (the log bounds
        the held writes too: they are in it)."""
        if not self._log_has_room(len(piece)):
            self._flush_locked()                 # keeps the re-send log bounded
        self._seq += 1
        entry = _Logged(offset, piece, self._seq)
        self._log.append(entry)
        self._log_bytes += len(piece)
        return entry

    def _log_has_room(self, length: int) -> bool:
        return self._log_bytes + length <= LOG_LIMIT

    def _write_piece(self, offset: int, piece: bytes) -> None:
        server = self._put(self._logged(offset, piece))
        if server is not None:
            self.written[server] = self.written.get(server, 0) + len(piece)

    def _write_started(self, offset: int, piece: bytes) -> _Request | None:
        """Send one piece (written at once, waiting, if no server takes it; held if
        an older write over it is maybe in flight)."""
        entry = self._logged(offset, piece)
        try:
            if self._must_wait(entry):
                raise _Blocked
            req = self._start(MsgType.BLOCK_WRITE, {"off": offset, "data": piece}, offset,
                              len(piece), entry)
        except _Blocked:
            self._hold(entry)
            return None
        server = req.server if req is not None else self._put(entry)
        if server is not None:
            self.written[server] = self.written.get(server, 0) + len(piece)
        return req

    @property
    def behind_pending(self) -> int:
        """Bytes of writes queued, sent and not answered yet, maybe in flight, or held
        (a drain waits for all of them)."""
        pending = self._inflight_written + self._pending.length
        if self._lingering or self._held:
            pending += sum(len(e.data) for e in list(self._held))
            pending += sum(n for c in list(self._lingering)
                           for _, n, _ in list(c.writes.values()))
        return pending

    def behind_has_room(self, length: int) -> bool:
        """Whether `length` more bytes can be queued with nothing waiting for a
        server: a window slot for every piece queueing them may send (the queued run
        as it is, then theirs), and room in the re-send log for all of it. A writer
        asks before it queues (FileData._check_room) and, when there is none, waits
        in a worker thread (wait_behind_room): a full window (replies read) or a full
        log (a flush) waited on the mount's event loop."""
        pieces = -(-self._pending.length // PIECE) + -(-length // PIECE)
        window = not self._inflight or len(self._inflight) + pieces <= WINDOW
        log = not self._log or self._log_has_room(self._pending.length + length)
        return window and log

    def wait_behind_room(self, length: int) -> None:
        """Read replies, and flush when the re-send log is full, until queueing
        `length` bytes waits for nothing (from a worker thread: the event loop then
        never waits for them)."""
        with self._lock:
            while self._inflight and not self.behind_has_room(length):
                self._finish(self._inflight[0])
            if not self.behind_has_room(length):
                self._send_pending()
                self._flush_locked()

    def drain(self) -> None:
        """Send the queued writes and wait for every write in flight, maybe in flight or
        held (the next holder of a lock reads them on the disk); StorageError if one
        failed for good."""
        with self._lock:
            self._send_pending()
            self._quiesce()


    def bypass_page_cache(self) -> bool:
        return True                             # the servers read and write O_DIRECT

    def flush(self) -> None:
        if self._refused is not None:
            raise StorageError(f"{self.path}: flush: {self._refused}")
        self._guard()
        with self._lock:
            self._send_pending()
            self._flush_locked()

    def _flush_locked(self) -> None:
        """Flush through every server written since the last flush; a silent one's
        writes are re-sent elsewhere (_mark_silent) and flushed there."""
        self.stats["flushes"] += 1
        while True:
            self._quiesce()                 # a flush covers only answered writes, and
            self._flush_servers()           # none may land late after it (module doc)
            if not (self._lingering or self._held or self._inflight):
                break                       # (a server went silent during the flush)
        failover.leave(FAILOVER_PHASE)      # a silent server's writes are flushed elsewhere
        self._log.clear()
        self._log_bytes = 0

    def _flush_servers(self) -> None:
        while self._unflushed:
            server = min(self._unflushed)
            try:
                self._send_to(server, MsgType.BLOCK_FLUSH, {})
            except _Silent as exc:
                self._mark_silent(server, exc)     # re-sends the log elsewhere
                continue
            self._unflushed.discard(server)

    def refuse_writes(self, reason: str) -> None:
        self._refused = reason

    def close(self) -> None:
        """Send the queued writes and wait for the writes in flight (a failure is
        logged: the caller flushed before if it cared), then close every connection."""
        with self._lock:
            try:
                self._send_pending()
                self._quiesce()
            except StorageError as exc:
                log.warning("node %d: %s: writes in flight at close: %s", self.node_id,
                            self.path, exc)
            for server in list(self._conns):
                self._drop(server)
            for conn in self._lingering:
                conn.close()
            self._lingering.clear()
        failover.leave(FAILOVER_PHASE)       # a closed proxy re-targets nothing

    def statistics(self) -> dict[str, Any]:
        return {**self.stats, "per_server": dict(self.per_server),
                "written": dict(self.written),
                "silent": sorted(self._silent), "io_timeout": self.io_timeout,
                "unsettled": sum(len(c.writes) for c in list(self._lingering)),
                "holding": len(self._held), "queued": self._pending.length,
                "fenced_servers": dict(self._fenced_in),
                "preferred": {k.decode(errors="replace"): s
                              for k, s in sorted(self._preferred.items())},
                "retarget_times": self.retarget_times[-50:]}


def _on_event_loop() -> bool:
    """Whether this thread runs a trio event loop (the mount's: its fs and journal
    call the device there, synchronously)."""
    try:
        trio.lowlevel.current_trio_token()
    except RuntimeError:
        return False
    return True
