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
seconds (config `[storage] io_timeout`, well below failure_timeout). When a
server does not answer in time, refuses, or its connection breaks, the proxy
marks it silent (for SILENT_FOR seconds or until the view changes), logs it,
calls `on_silent(server)` (the mount tells membership to probe that node and asks
the masters for new preferred servers there), and retries the request on the next
live server of the resource's order; the caller sees no error. Only when no
server is left does the I/O fail (StorageError).

No acknowledged write is lost. A server acknowledges a write once its device
took it, but only a flush makes it durable. So the proxy keeps every write since
the last completed flush (at most LOG_LIMIT bytes: past that it flushes by
itself), and when a server that took some of them goes silent it sends the whole
log again, in order, through another server before going on. A flush goes to
every server written through since the last one.

The writes a silent server may still hold (it was stopped, not dead) are the
servers' and the fencing agents' business: a server refuses a write that waited
longer than half the io_timeout, and a server removed from the view is fenced by
the survivors before any recovery.

Requests carry this node's membership generation (`attach(view)`); a server
refuses writes from a node outside its view or from an older life of it.
Thread-safe: one lock, one request in flight per device.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from clusterfs import failover
from clusterfs.config import ClusterConfig
from clusterfs.dlm.preferred import server_order
from clusterfs.errors import StorageError, WireError
from clusterfs.format.block import BLOCK_SIZE
from clusterfs.storage import blockwire as bw
from clusterfs.storage.device import BlockAddressed, WritesAtOnce
from clusterfs.wire import frame as wf
from clusterfs.wire.types import MsgType

log = logging.getLogger(__name__)

LOG_LIMIT = 64 << 20         # unflushed write bytes kept for a re-send; past it, flush
SILENT_FOR = 30.0            # a silent server is skipped this long (or to a new view)
REFUSED_WAIT = 4             # x io_timeout: how long to retry when every server refuses
SCHEME = "proxy://"
FAILOVER_PHASE = "proxy re-target"    # clusterfs.failover: a silent server until re-targeted

View = tuple[int, frozenset[int]]          # (generation, members)
Locate = Callable[[int], bytes]            # byte offset -> key of its covering resource
UNMAPPED = b""                             # the key of every offset before route_by


class _Silent(Exception):
    """This server did not answer in time, broke the connection, or refused."""


class _Connection:
    """One authenticated connection to one block server (blocking socket)."""

    def __init__(self, cfg: ClusterConfig, me: int, server: int, timeout: float) -> None:
        self.server = server
        host, port = cfg.block_server(server)
        try:
            self.sock = socket.create_connection((host, port), timeout=timeout)
        except OSError as exc:
            raise _Silent(f"cannot connect to block server {server} at {host}:{port}: "
                          f"{exc.strerror or exc}") from exc
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray()
        self.me = me
        self.out, self.inb = bw.Sequencer(), bw.Sequencer()
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
        return wf.session_key(cfg.key, self.me, self.server, nc, ns)

    def request(self, mtype: int, generation: int, body: dict[str, Any],
                timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        self._send(wf.encode_prefixed(self.skey, mtype, self.me, generation,
                                      self.out.take(), body), deadline)
        f = wf.decode(self.skey, self._recv(deadline), max_frame=bw.MAX_FRAME)
        self.inb.check(f, self.server)
        reply = f.body
        if f.type != MsgType.BLOCK_REPLY or not isinstance(reply, dict) \
                or reply.get("id") != body["id"]:
            raise WireError(f"block server {self.server}: reply does not match the request")
        return reply

    def _send(self, data: bytes, deadline: float) -> None:
        self.sock.settimeout(max(0.001, deadline - time.monotonic()))
        self.sock.sendall(data)

    def _recv(self, deadline: float) -> bytes:
        head = wf.LENGTH.size
        self._fill(head, deadline)
        (n,) = wf.LENGTH.unpack_from(self.buf)
        wf.check_length(n, bw.MAX_FRAME)
        self._fill(head + n, deadline)
        data = bytes(self.buf[head : head + n])
        del self.buf[: head + n]
        return data

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
        self.on_silent: Callable[[int], None] | None = None
        self.on_fenced: Callable[[str], None] | None = None     # a server says: fenced
        self._view: Callable[[], View] | None = None
        self._locate: Locate | None = None
        self._preferred: dict[bytes, int] = {}             # resource key -> named server
        self._preferred_gen = 0                            # view it was last pruned for
        self._retarget_pending = False                     # a server went silent since
        self._lock = threading.RLock()
        self._conns: dict[int, _Connection] = {}
        self._silent: dict[int, tuple[float, int]] = {}    # server -> (until, generation)
        self._log: list[tuple[int, bytes]] = []
        self._log_bytes = 0
        self._unflushed: set[int] = set()                  # servers written since flush
        self._refused: str | None = None
        self._ids = 0
        self.stats = {"reads": 0, "writes": 0, "flushes": 0, "requests": 0,
                      "timeouts": 0, "retargets": 0, "resent": 0, "refusals": 0,
                      "to_named": 0, "to_computed": 0}
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

    def _call(self, mtype: int, body: dict[str, Any], offset: int
              ) -> tuple[int, dict[str, Any]]:
        """Send one request to the first live server that answers: (server, reply).
        When every server failed, try them all again for up to REFUSED_WAIT x
        io_timeout (views changing, a server in quarantine) before giving up."""
        errors: list[str] = []
        deadline = time.monotonic() + REFUSED_WAIT * self.io_timeout
        while True:
            order = self._candidates(offset)
            if not order and self._silent and time.monotonic() <= deadline:
                self._silent.clear()          # every server silent: try them all again
                continue
            for server in order:
                try:
                    reply = self._send_to(server, mtype, body)
                except _Silent as exc:
                    errors.append(str(exc))
                    self._mark_silent(server, str(exc))
                    continue
                return server, reply
            if time.monotonic() > deadline:
                break
            time.sleep(0.1)
            self._silent.clear()
        why = "; ".join(errors[-3:]) or "none live"
        raise StorageError(f"{self.path}: no block server left ({why})")

    def _send_to(self, server: int, mtype: int, body: dict[str, Any]) -> dict[str, Any]:
        self._ids += 1
        body = {**body, "id": self._ids}
        generation = self._current()[0]
        self.stats["requests"] += 1
        try:
            reply = self._exchange(server, mtype, generation, body)
        except TimeoutError as exc:
            self.stats["timeouts"] += 1
            self._drop(server)
            raise _Silent(f"block server {server}: no answer within {self.io_timeout:g} s"
                          ) from exc
        except (OSError, WireError) as exc:
            self._drop(server)
            raise _Silent(f"block server {server}: {exc}") from exc
        except _Silent:
            self._drop(server)
            raise
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

    def _exchange(self, server: int, mtype: int, generation: int, body: dict[str, Any]
                  ) -> dict[str, Any]:
        conn = self._conns.get(server)
        if conn is not None:
            try:
                return conn.request(mtype, generation, body, self.io_timeout)
            except ConnectionError:
                # a connection made earlier was closed under us (the server restarted,
                # or dropped it): no silence yet. Once more on a new one (a request
                # is idempotent, and nothing else was sent meanwhile)
                self._drop(server)
        conn = self._conns[server] = _Connection(self.cfg, self.node_id, server,
                                                 self.io_timeout)
        return conn.request(mtype, generation, body, self.io_timeout)

    def _drop(self, server: int) -> None:
        conn = self._conns.pop(server, None)
        if conn is not None:
            conn.close()

    def _mark_silent(self, server: int, why: str) -> None:
        failover.enter(FAILOVER_PHASE)
        generation = self._current()[0]
        self._silent[server] = (time.monotonic() + SILENT_FOR, generation)
        self._retarget_pending = True
        log.warning("node %d gen %d: %s; re-targeting to another server of the storage "
                    "group", self.node_id, generation, why)
        if self.on_silent is not None:
            self.on_silent(server)
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
        since the last flush again, in order (the others' too: the same final state)."""
        for offset, data in list(self._log):
            server, _ = self._call(MsgType.BLOCK_WRITE, {"off": offset, "data": data}, offset)
            self._unflushed.add(server)
            self.stats["resent"] += 1

    # -- the device interface --------------------------------------------------------
    def _info(self) -> int:
        _server, reply = self._call(MsgType.BLOCK_INFO, {}, 0)
        size = reply.get("size")
        if not isinstance(size, int):
            raise StorageError(f"{self.path}: block server sent no size")
        return size

    def pread(self, offset: int, length: int) -> bytes:
        end = min(offset + length, self.size)
        out = []
        with self._lock:
            self.stats["reads"] += 1
            at = offset
            while at < end:
                n = min(bw.MAX_IO, end - at)
                _server, reply = self._call(MsgType.BLOCK_READ, {"off": at, "len": n}, at)
                data = reply.get("data")
                if not isinstance(data, bytes) or len(data) != n:
                    raise StorageError(f"{self.path}: short read at {at}")
                out.append(data)
                at += n
        return out[0] if len(out) == 1 else b"".join(out)

    def read_data(self, offset: int, length: int) -> bytes:
        return self.pread(offset, length)

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        if self._refused is not None:
            raise StorageError(f"{self.path}: write at {offset}: {self._refused}")
        self._guard()
        if offset < 0 or offset + len(data) > self.size:
            raise StorageError(f"{self.path}: write at {offset}: beyond the end of the "
                               f"device ({self.size} bytes)")
        raw = bytes(data)
        with self._lock:
            self.stats["writes"] += 1
            for at in range(0, len(raw), bw.MAX_IO):
                piece = raw[at : at + bw.MAX_IO]
                self._write_piece(offset + at, piece)

    def _write_piece(self, offset: int, piece: bytes) -> None:
        if self._log_bytes + len(piece) > LOG_LIMIT:
            self._flush_locked()                 # keeps the re-send log bounded
        self._log.append((offset, piece))
        self._log_bytes += len(piece)
        server, _ = self._call(MsgType.BLOCK_WRITE, {"off": offset, "data": piece}, offset)
        self._unflushed.add(server)
        self.written[server] = self.written.get(server, 0) + len(piece)


    def bypass_page_cache(self) -> bool:
        return True                             # the servers read and write O_DIRECT

    def flush(self) -> None:
        if self._refused is not None:
            raise StorageError(f"{self.path}: flush: {self._refused}")
        self._guard()
        with self._lock:
            self._flush_locked()

    def _flush_locked(self) -> None:
        """Flush through every server written since the last flush; a silent one's
        writes are re-sent elsewhere (_mark_silent) and flushed there."""
        self.stats["flushes"] += 1
        while self._unflushed:
            server = min(self._unflushed)
            try:
                self._send_to(server, MsgType.BLOCK_FLUSH, {})
            except _Silent as exc:
                self._mark_silent(server, str(exc))     # re-sends the log elsewhere
                continue
            self._unflushed.discard(server)
        failover.leave(FAILOVER_PHASE)      # a silent server's writes are flushed elsewhere
        self._log.clear()
        self._log_bytes = 0

    def refuse_writes(self, reason: str) -> None:
        self._refused = reason

    def close(self) -> None:
        with self._lock:
            for server in list(self._conns):
                self._drop(server)

    def statistics(self) -> dict[str, Any]:
        return {**self.stats, "per_server": dict(self.per_server),
                "written": dict(self.written),
                "silent": sorted(self._silent), "io_timeout": self.io_timeout,
                "preferred": {k.decode(errors="replace"): s
                              for k, s in sorted(self._preferred.items())},
                "retarget_times": self.retarget_times[-50:]}
