"""The TCP transport: one node's Endpoint (clusterfs.comms.interface) over trio TCP.

Shape:
- every node listens on its configured address;
- for every other configured node it keeps ONE outgoing connection and one task
  for it (connect, handshake, reconnect with exponential backoff). Incoming
  connections only carry frames toward this node, so there is never a
  duplicate-connection race;
- sending: `send_nowait` writes the frame straight to the socket from the
  caller's task when nothing waits before it and the kernel takes it (the usual
  case: no task switch at all). Otherwise the message waits in a bounded per-peer
  queue (while connecting, or behind bytes the kernel did not take), and the
  connection's writer task writes everything waiting in one send;
- receiving: one task per incoming connection reads whole chunks and takes every
  complete frame out of each. A frame whose handler was registered inline (a
  plain function that never blocks, as the DLM's) is handled right there when
  nothing else of its sender is pending; every other frame goes to a per-sender
  lane (an inbox and one task), so the handlers for one sender run one at a time
  in arrival order, while different senders proceed independently.

We drive the (non-blocking) stdlib sockets ourselves and wait with trio only when
the kernel says "later": trio's stream wrapper would cost a trip through the
scheduler for every send and receive that succeeds at once.

Handshake (frames MAC'd with the cluster key, type HELLO, seq 0)::

    client -> server  {cluster, to: server_id, nonce: Nc}
    server -> client  {cluster, to: client_id, nonce: Ns, echo: Nc}
    client -> server  HELLO seq 1 under the session key (confirmation)

The server checks the client is a configured node id (not itself) and the client
checks the answer comes from the node it dialled and echoes its nonce. After it,
frames are MAC'd with session_key(K, client, server, Nc, Ns) and carry seq 1, 2,
... which must arrive exactly in order: a replayed HELLO leads nowhere (the
attacker cannot sign under the new session key), a replayed or reordered data
frame fails the seq check. A new connection from a sender replaces its older one
only after its first correctly signed session frame.

A frame failing any check (WireError) is dropped, logged in one line, and that
connection is closed; the node keeps serving everyone else.

Reliable delivery between two processes (as the Linux DLM's midcomms does it over
its connections). A connection can break while both ends live on (a reset, a
network cut shorter than the failure timeout, a write that failed): the peer stays
in the view, and a message lost with the connection (a DLM grant, an unlock) would
hang a lock for good. So each sender numbers the messages of its stream to a peer
implicitly (the n-th data frame of the stream, over all its connections, is
message n) and keeps every message until the peer's process confirms it:

- every endpoint has an `epoch` (random, per process) and, per peer, a `stream`
  token (random, per stream); the client's HELLO carries its stream token, the
  server's answer its epoch and how many messages of that stream it has handed to
  its handlers (`delivered`: 0 for a stream it does not know);
- the client resumes after `delivered`: what it still keeps beyond that is written
  again on the new connection, in order, before anything newer; the server numbers
  the new connection's frames from `delivered` on and skips a number it has
  already handed over (an older connection may have delivered more after the
  answer went out), so nothing is delivered twice and nothing is skipped;
- the server acknowledges on the same connection (HELLO frames under the session
  key, seq 1, 2, ... of their own, body {"ack": n}) every ACK_EVERY messages or
  ACK_DELAY after the first unacknowledged one; the client then forgets them;
- what was kept for one process is never given to another: an answer with another
  epoch than the stream's (the peer restarted at its address) drops everything kept
  for the old one first. A stream not yet bound to a process (never connected)
  drops its queue when a connection attempt fails, as before.

`send_nowait()` (and `send()`, the same for coroutines) never blocks: it raises
PeerUnreachable when the destination is not a configured node, when it was never
reached and the last attempt failed (the peer is "down"; a background task keeps
retrying with backoff), or when what is kept for it (queued and unacknowledged)
is QUEUE_DEPTH messages. A peer that was reached and is down now (a cut, a process
gone) keeps queuing: its process may come back on the next connection. Nothing is
ever reordered.
"""

from __future__ import annotations

import errno
import logging
import secrets
import socket
from collections import deque
from collections.abc import Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import trio

from clusterfs.comms.interface import Envelope, Handler, InlineHandler, RefusalListener
from clusterfs.config import ClusterConfig
from clusterfs.errors import ListenError, PeerUnreachable, WireError
from clusterfs.wire import frame as wf
from clusterfs.wire.types import MsgType

log = logging.getLogger(__name__)

QUEUE_DEPTH = 10_000
INBOX_DEPTH = 1_000
BACKOFF_MIN = 0.05
BACKOFF_MAX = 1.0
NONCE_SIZE = 16
MAX_HANDSHAKING = 256      # connections still in their handshake; more are refused
RECEIVE_SIZE = 65536
WRITE_BATCH = 256 * 1024
ACK_EVERY = 64             # messages delivered before the receiver acknowledges at once
ACK_DELAY = 0.05           # else this long after the first unacknowledged one
_HANDLER_FAILED = "node %d gen %d: handler for type %d from node %d failed"


class _Closed(Exception):
    """The other side closed the stream."""


# -- sockets, driven without trio's stream wrapper (see the module docstring) -----


def _detach(stream: trio.SocketStream) -> socket.socket:
    """The stdlib socket under a trio stream; the stream must not be used after."""
    sock = socket.socket(fileno=stream.socket.detach())
    sock.setblocking(False)
    return sock


def _close(sock: socket.socket) -> None:
    trio.lowlevel.notify_closing(sock)    # wakes any task still waiting on it
    sock.close()


async def _send_all(sock: socket.socket, data: bytes | bytearray) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[sock.send(view):]
        except BlockingIOError:
            await trio.lowlevel.wait_writable(sock)


class _FrameReader:
    """Length-prefixed frames from a socket, in whole chunks of what has arrived."""

    def __init__(self, sock: socket.socket, max_frame: int) -> None:
        self.sock = sock
        self.max_frame = max_frame
        self.buf = bytearray()

    async def _receive(self) -> None:
        while True:
            await trio.lowlevel.wait_readable(self.sock)
            try:
                data = self.sock.recv(RECEIVE_SIZE)
            except BlockingIOError:
                continue     # woken without data (it can happen): wait again
            if not data:
                raise _Closed()
            self.buf += data
            return

    def _next(self) -> bytes | None:
        """The next complete frame in the buffer (without its prefix), or None."""
        return wf.take_frame(self.buf, self.max_frame)

    async def read(self) -> bytes:
        """One frame (the handshake reads one at a time: what follows stays here)."""
        while (data := self._next()) is None:
            await self._receive()
        return data

    async def read_batch(self) -> list[bytes]:
        """Every complete frame that has arrived; waits for at least one."""
        batch = [await self.read()]
        try:
            while (data := self._next()) is not None:
                batch.append(data)
        except WireError:
            pass    # a bad length: raised again by the next call, after these frames
        return batch


@dataclass
class PeerStats:
    node_id: int
    state: str
    queued: int      # messages waiting for a connection (or for the writer)
    sent: int        # frames put on a connection (a message written again counts again)
    dropped: int     # messages never delivered: queue full, its process gone, never reached
    connects: int
    connect_failures: int
    unacked: int = 0     # written, not yet confirmed by the peer's process
    resent: int = 0      # messages written again on a new connection to the same process


@dataclass
class TcpStatistics:
    node_id: int
    generation: int
    frames_in: int
    frames_out: int
    wire_errors: int
    handshake_failures: int
    connections_in: int
    refused: int
    peers: list[PeerStats] = field(default_factory=list)
    duplicates: int = 0      # frames a resumed stream carried again, skipped here


@dataclass(eq=False)
class _Link:
    """The sending half of an authenticated connection to a peer.

    `send_nowait` writes a frame straight to the socket while nothing is waiting
    before it; what the kernel does not take at once waits in `unsent` for the
    link's writer task, and later messages queue behind it (FIFO)."""
    sock: socket.socket
    skey: bytes
    seq: int = 0
    unsent: bytearray = field(default_factory=bytearray)
    broken: OSError | None = None           # a write from send_nowait failed
    wake: trio.Event = field(default_factory=trio.Event)   # the writer has work


_Message = tuple[int, int, bytes]     # (type, generation when sent, packed body)


def _new_token() -> bytes:
    return secrets.token_bytes(NONCE_SIZE)


@dataclass
class _Peer:
    """The sending side toward one peer, and the stream of messages to its process:
    message `acked + 1` is `unacked[0]` (or `queue[0]` when nothing is unacked)."""
    node_id: int
    host: str
    port: int
    queue: deque[_Message] = field(default_factory=deque)     # not yet on this link
    unacked: deque[_Message] = field(default_factory=deque)   # written, not confirmed
    acked: int = 0                 # messages of the stream the peer confirmed
    stream: bytes = field(default_factory=_new_token)
    epoch: bytes | None = None     # the peer process the stream is bound to
    resent: int = 0
    rewound: int = 0               # of the queue's head: written on a link that broke
    link: _Link | None = None      # set while up and past the handshake
    state: str = "connecting"      # connecting | up | down
    sent: int = 0
    dropped: int = 0
    connects: int = 0
    connect_failures: int = 0
    refused_at: float | None = None    # its host refused our last connect (see below)
    wake: trio.Event = field(default_factory=trio.Event)    # the peer connected to us


@dataclass(eq=False)
class _InStream:
    """One sender's stream as received here: how many of its messages were handed
    to the handlers. A new connection of the same stream resumes after them."""
    token: bytes
    delivered: int = 0


@dataclass(eq=False)
class _AckState:
    """The acknowledgements of one incoming connection. It acknowledges only what
    it carried itself (`carried`: the number of its last data frame, duplicates
    included): the client numbers what it writes from the resume point on, so it
    cannot be told of messages an older connection delivered beyond that before
    it has written them again."""
    told: int
    carried: int
    wake: trio.Event = field(default_factory=trio.Event)

    def confirmable(self, stream: _InStream) -> int:
        return min(stream.delivered, self.carried) - self.told


@dataclass(eq=False)
class _Lane:
    """The handlers of one sender: one at a time, in arrival order. `pending`
    counts envelopes given to the lane's task and not yet handled; while it is 0
    an inline handler may run at once, in the reading task."""
    inbox: trio.MemorySendChannel[Envelope]
    pending: int = 0


class TcpEndpoint:
    """One node's TCP door. Run `serve()` in a nursery (or use open_tcp_endpoint)."""

    def __init__(self, config: ClusterConfig, node_id: int) -> None:
        self.config = config
        self.node_id = node_id
        self.generation = 0
        self.me = config.node(node_id)
        self._key = config.key
        self._handlers: dict[int, Handler] = {}
        self._inline: dict[int, InlineHandler] = {}
        self._peers: dict[int, _Peer] = {
            n.id: _Peer(n.id, n.host, n.port) for n in config.nodes if n.id != node_id}
        self._lanes: dict[int, _Lane] = {}
        # client -> its current incoming connection: its cancel scope, and an event set
        # once that connection's task is over (so nothing more is delivered by it)
        self._current_in: dict[int, tuple[trio.CancelScope, trio.Event]] = {}
        self._in_streams: dict[int, _InStream] = {}
        self._refusal_listeners: list[RefusalListener] = []
        self.epoch = _new_token()      # this process, as its peers' streams know it
        self._nursery: trio.Nursery | None = None
        self.frames_in = 0
        self.frames_out = 0
        self.wire_errors = 0
        self.handshake_failures = 0
        self.connections_in = 0
        self.refused = 0
        self.duplicates = 0
        self._handshaking = 0
        self.listen_port: int | None = None
        self._listeners: list[trio.SocketListener] | None = None

    # -- the Endpoint contract ------------------------------------------------
    async def send(self, dest: int, mtype: int, body: Any) -> None:
        self.send_nowait(dest, mtype, body)

    def send_nowait(self, dest: int, mtype: int, body: Any) -> None:
        packed = wf.encode_body(body)
        if dest == self.node_id:
            self._deliver_nowait(Envelope(self.node_id, self.generation, int(mtype),
                                          wf.decode_body(packed)))
            return
        peer = self._peers.get(dest)
        if peer is None:
            raise PeerUnreachable(f"node {dest} is not a configured node")
        if peer.state == "down" and peer.epoch is None:
            raise PeerUnreachable(f"node {dest} unreachable from {self.node_id}")
        if len(peer.queue) + len(peer.unacked) >= QUEUE_DEPTH:
            peer.dropped += 1
            raise PeerUnreachable(f"node {dest}: send queue full")
        message = (int(mtype), self.generation, packed)
        link = peer.link
        if link is not None and not peer.queue and not link.unsent and link.broken is None:
            self._write_through(peer, link, message)
            return
        peer.queue.append(message)
        if link is not None:
            link.wake.set()

    def register(self, mtypes: Iterable[int], handler: Handler) -> None:
        for t in mtypes:
            self._inline.pop(int(t), None)
            self._handlers[int(t)] = handler

    def register_inline(self, mtypes: Iterable[int], handler: InlineHandler) -> None:
        for t in mtypes:
            self._handlers.pop(int(t), None)
            self._inline[int(t)] = handler

    def on_refused(self, listener: RefusalListener) -> None:
        self._refusal_listeners.append(listener)

    # -- introspection ---------------------------------------------------------
    def peer_state(self, dest: int) -> str:
        return self._peers[dest].state

    def refused_at(self, dest: int) -> float | None:
        peer = self._peers.get(dest)
        if peer is None or not self.config.dead_on_refusal:
            return None      # (configured off: only the failure timeout judges a peer)
        return peer.refused_at

    def statistics(self) -> TcpStatistics:
        return TcpStatistics(
            self.node_id, self.generation, self.frames_in, self.frames_out, self.wire_errors,
            self.handshake_failures, self.connections_in, self.refused,
            [PeerStats(p.node_id, p.state, len(p.queue), p.sent, p.dropped, p.connects,
                       p.connect_failures, len(p.unacked), p.resent)
             for p in self._peers.values()],
            self.duplicates)

    # -- running ---------------------------------------------------------------
    async def listen(self) -> None:
        """Bind this node's address, if not done yet: ListenError (one line) when it is
        taken or not ours. A node binds before anything else of it starts, so a second
        copy of a running node is refused before it touches anything shared."""
        if self._listeners is not None:
            return
        try:
            self._listeners = await trio.open_tcp_listeners(self.me.port, host=self.me.host)
        except OSError as exc:
            hint = (f" (is node {self.node_id} already running?)"
                    if exc.errno == errno.EADDRINUSE else "")
            raise ListenError(f"node {self.node_id}: cannot listen on {self.me.address}: "
                              f"{exc.strerror or exc}{hint}") from None
        self.listen_port = self._listeners[0].socket.getsockname()[1]

    def close_listeners(self) -> None:
        """Give the address back (after serve, which closes them itself, a no-op)."""
        for listener in self._listeners or ():
            listener.socket.close()

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                    ) -> None:
        await self.listen()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            listeners = self._listeners
            assert listeners is not None
            log.info("node %d gen %d: listening on %s", self.node_id, self.generation,
                     self.me.address)
            for peer in self._peers.values():
                nursery.start_soon(self._peer_loop, peer)
            nursery.start_soon(trio.serve_listeners, self._serve_conn, listeners)
            task_status.started()

    # -- sending side ----------------------------------------------------------
    async def _peer_loop(self, peer: _Peer) -> None:
        backoff = BACKOFF_MIN
        while True:
            try:
                sock, skey = await self._connect(peer)
            except (OSError, WireError, trio.TooSlowError, _Closed,
                    trio.BrokenResourceError) as exc:
                peer.connect_failures += 1
                if _refused(exc):
                    # the peer's kernel answered with a reset: no process listens at
                    # its address (a silent host would have let us time out instead)
                    peer.refused_at = trio.current_time()
                    self._tell_refused(peer.node_id)
                if peer.state != "down":
                    log.info("node %d gen %d: peer %d down: %s", self.node_id,
                             self.generation, peer.node_id, _why(exc))
                peer.state = "down"
                if peer.epoch is None:
                    self._drop_queue(peer)   # never reached: nobody to keep it for
                peer.wake = trio.Event()
                with trio.move_on_after(backoff):
                    await peer.wake.wait()      # set when the peer connects to us
                backoff = min(backoff * 2, BACKOFF_MAX)
                continue
            backoff = BACKOFF_MIN
            peer.connects += 1
            peer.state = "up"
            peer.refused_at = None
            log.info("node %d gen %d: connected to peer %d", self.node_id, self.generation,
                     peer.node_id)
            link = _Link(sock, skey)
            try:
                async with trio.open_nursery() as n:
                    n.start_soon(self._read_acks, peer, link)
                    await self._write_loop(peer, link)
            except* (OSError, WireError, trio.BrokenResourceError,
                     trio.ClosedResourceError, _Closed) as exc:
                # except*: trio wraps what the nursery's tasks raised in an ExceptionGroup
                log.info("node %d gen %d: connection to peer %d lost: %s", self.node_id,
                         self.generation, peer.node_id, _why(exc))
            finally:
                peer.link = None
                _close(sock)
            # What the peer's process has not confirmed is kept for it: the next
            # connection writes it again if that same process answers (_resume).
            self._rewind(peer)
            peer.state = "connecting"

    def _tell_refused(self, dest: int) -> None:
        if not self.config.dead_on_refusal:
            return       # (configured off: only the failure timeout judges a peer)
        for listener in self._refusal_listeners:
            try:
                listener(dest)
            except Exception:
                log.exception("node %d gen %d: refusal listener failed for node %d",
                              self.node_id, self.generation, dest)

    async def _connect(self, peer: _Peer) -> tuple[socket.socket, bytes]:
        with trio.fail_after(self.config.connect_timeout):
            sock = _detach(await trio.open_tcp_stream(peer.host, peer.port))
            try:
                # A link that goes dead under an open connection (a cable pulled, a
                # partition) must break it: TCP would otherwise retransmit with a
                # backoff that reaches tens of seconds, and after the link is back the
                # peers would go on not hearing each other that long. Data
                # unacknowledged for a failure timeout aborts the connection; we then
                # dial again (with our own backoff).
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT,
                                int(self.config.failure_timeout * 1000))
                nc = secrets.token_bytes(NONCE_SIZE)
                hello = {"cluster": self.config.name, "to": peer.node_id, "nonce": nc,
                         "stream": peer.stream}
                await _send_all(sock, wf.encode_prefixed(self._key, MsgType.HELLO,
                                                         self.node_id, self.generation, 0, hello))
                f = wf.decode(self._key, await _FrameReader(sock, self.config.max_frame).read(),
                              max_frame=self.config.max_frame)
                b = f.body
                if (f.type != MsgType.HELLO or f.sender != peer.node_id or f.seq != 0
                        or not isinstance(b, dict) or b.get("echo") != nc
                        or b.get("to") != self.node_id or b.get("cluster") != self.config.name
                        or not isinstance(b.get("nonce"), bytes)
                        or not isinstance(b.get("epoch"), bytes)
                        or not isinstance(b.get("delivered"), int)):
                    raise WireError(f"bad handshake answer from {peer.host}:{peer.port}")
                skey = wf.session_key(self._key, self.node_id, peer.node_id, nc, b["nonce"])
                self._resume(peer, b["epoch"], b["delivered"])
                return sock, skey
            except BaseException:
                _close(sock)
                raise

    async def _write_loop(self, peer: _Peer, link: _Link) -> None:
        """Confirm the session, then write what send_nowait could not write itself:
        the messages queued while connecting, and whatever the kernel did not take."""
        link.seq = 1
        await _send_all(link.sock, wf.encode_prefixed(link.skey, MsgType.HELLO, self.node_id,
                                                      self.generation, link.seq, None))
        peer.link = link
        while True:
            if link.broken is not None:
                raise link.broken
            if link.unsent:
                await trio.lowlevel.wait_writable(link.sock)
                self._flush(link)
            elif peer.queue:
                self._encode_queue(peer, link)
                self._flush(link)
            else:
                link.wake = trio.Event()
                await link.wake.wait()

    def _write_through(self, peer: _Peer, link: _Link, message: _Message) -> None:
        """Write one frame from the caller's task: no task switch when the kernel
        takes it at once (a round trip's usual case)."""
        mtype, gen, packed = message
        link.seq += 1
        data = wf.encode_prefixed(link.skey, mtype, self.node_id, gen, link.seq,
                                  None, packed_body=packed)
        peer.unacked.append(message)
        peer.sent += 1
        self.frames_out += 1
        try:
            n = link.sock.send(data)
        except BlockingIOError:
            n = 0
        except OSError as exc:
            # The connection is broken: the writer raises it and the peer loop
            # reconnects; the frame is kept (unacked) for the next connection.
            link.broken = exc
            link.wake.set()
            return
        if n < len(data):
            link.unsent += data[n:]
            link.wake.set()

    def _encode_queue(self, peer: _Peer, link: _Link) -> None:
        """Queued messages as frames in `unsent`, one buffer for one send; at most
        about WRITE_BATCH bytes, so a long queue is not copied whole at once."""
        while peer.queue and len(link.unsent) < WRITE_BATCH:
            message = peer.queue.popleft()
            peer.unacked.append(message)
            mtype, gen, packed = message
            link.seq += 1
            link.unsent += wf.encode_prefixed(link.skey, mtype, self.node_id, gen, link.seq,
                                              None, packed_body=packed)
            peer.sent += 1
            self.frames_out += 1

    @staticmethod
    def _flush(link: _Link) -> None:
        try:
            n = link.sock.send(link.unsent)
        except BlockingIOError:
            return
        del link.unsent[:n]

    async def _read_acks(self, peer: _Peer, link: _Link) -> None:
        """The server writes only acknowledgements after the handshake: each lets us
        forget what its process has; anything else (or EOF) ends the connection."""
        reader = _FrameReader(link.sock, self.config.max_frame)
        expect = 1
        while True:
            for data in await reader.read_batch():
                f = wf.decode(link.skey, data, max_frame=self.config.max_frame)
                ack = f.body.get("ack") if isinstance(f.body, dict) else None
                if (f.type != MsgType.HELLO or f.sender != peer.node_id or f.seq != expect
                        or not isinstance(ack, int)):
                    raise WireError(f"bad acknowledgement from node {peer.node_id}")
                expect += 1
                self._confirmed(peer, ack)

    @staticmethod
    def _confirmed(peer: _Peer, delivered: int) -> None:
        """The peer's process has the first `delivered` messages of our stream."""
        if not peer.acked <= delivered <= peer.acked + len(peer.unacked):
            raise WireError(f"node {peer.node_id} acknowledged message {delivered}; "
                            f"{peer.acked} confirmed, {len(peer.unacked)} written since")
        for _ in range(delivered - peer.acked):
            peer.unacked.popleft()
        peer.acked = delivered

    @staticmethod
    def _rewind(peer: _Peer) -> None:
        """The link is gone: what it carried unconfirmed goes first on the next one."""
        peer.rewound += len(peer.unacked)
        peer.queue.extendleft(reversed(peer.unacked))
        peer.unacked.clear()

    def _resume(self, peer: _Peer, epoch: bytes, delivered: int) -> None:
        """A new connection to `peer` answered: write again from `delivered` on, to the
        same process only. (Called after _rewind: nothing is in `unacked`.)"""
        if peer.epoch is not None and epoch != peer.epoch:
            log.info("node %d gen %d: peer %d is a new process: %d messages kept for "
                     "the old one dropped", self.node_id, self.generation, peer.node_id,
                     len(peer.queue))
            self._drop_queue(peer)
            peer.acked = 0
        if not peer.acked <= delivered <= peer.acked + len(peer.queue):
            # cannot happen between two of our processes; start a stream afresh
            self._drop_queue(peer)
            peer.acked, peer.stream, peer.epoch = 0, _new_token(), None
            raise WireError(f"node {peer.node_id} resumes our stream at {delivered}; "
                            "it was dropped")
        for _ in range(delivered - peer.acked):
            peer.queue.popleft()
        peer.resent += max(0, peer.rewound - (delivered - peer.acked))
        peer.rewound = 0
        peer.acked = delivered
        peer.epoch = epoch

    def _drop_queue(self, peer: _Peer) -> None:
        peer.rewound = 0
        peer.dropped += len(peer.queue) + len(peer.unacked)
        peer.queue.clear()
        peer.unacked.clear()

    # -- receiving side --------------------------------------------------------
    async def _serve_conn(self, stream: trio.SocketStream) -> None:
        self.connections_in += 1
        sock = _detach(stream)
        client = -1
        scope = trio.CancelScope()
        over = trio.Event()
        if self._handshaking >= MAX_HANDSHAKING:
            self.refused += 1
            log.warning("node %d gen %d: %d handshakes in progress; refusing %s",
                        self.node_id, self.generation, self._handshaking,
                        _peername(sock, client))
            _close(sock)
            return
        try:
            with scope:
                reader = _FrameReader(sock, self.config.max_frame)
                self._handshaking += 1
                try:
                    with trio.fail_after(self.config.connect_timeout):
                        client, skey, token, resume = await self._accept_handshake(
                            sock, reader)
                except WireError:
                    self.handshake_failures += 1
                    raise
                finally:
                    self._handshaking -= 1
                await self._read_loop(client, skey, reader, (scope, over), token, resume)
            if scope.cancelled_caught:
                # only _session_confirmed cancels it: the same node connected again
                log.info("node %d gen %d: connection from %s replaced by a newer one",
                         self.node_id, self.generation, _peername(sock, client))
        except* WireError as exc:
            self.wire_errors += 1
            log.warning("node %d gen %d: dropped connection from %s: %s", self.node_id,
                        self.generation, _peername(sock, client), _why(exc))
        except* (_Closed, OSError, trio.BrokenResourceError, trio.ClosedResourceError,
                 trio.TooSlowError) as exc:
            log.debug("node %d: incoming connection from %s ended: %s", self.node_id,
                      _peername(sock, client), _why(exc))
        finally:
            if self._current_in.get(client, (None, None))[0] is scope:
                del self._current_in[client]
            over.set()
            _close(sock)

    async def _accept_handshake(self, sock: socket.socket, reader: _FrameReader
                                ) -> tuple[int, bytes, bytes | None, int]:
        """(client, session key, its stream token, how many of that stream's
        messages were delivered here: the new connection resumes after them)."""
        f = wf.decode(self._key, await reader.read(), max_frame=self.config.max_frame)
        b = f.body
        if f.type != MsgType.HELLO or f.seq != 0:
            raise WireError(f"expected HELLO, got type {f.type} seq {f.seq}")
        if f.sender not in self._peers:
            raise WireError(f"HELLO from unknown node id {f.sender}")
        if (not isinstance(b, dict) or b.get("to") != self.node_id
                or b.get("cluster") != self.config.name
                or not isinstance(b.get("nonce"), bytes) or len(b["nonce"]) != NONCE_SIZE):
            raise WireError(f"bad HELLO from node {f.sender}")
        token = b.get("stream")
        if not isinstance(token, bytes):
            token = None          # a client that does not resume (a tool): never kept
        known = self._in_streams.get(f.sender)
        resume = known.delivered if known is not None and known.token == token else 0
        ns = secrets.token_bytes(NONCE_SIZE)
        answer = {"cluster": self.config.name, "to": f.sender, "nonce": ns, "echo": b["nonce"],
                  "epoch": self.epoch, "delivered": resume}
        await _send_all(sock, wf.encode_prefixed(self._key, MsgType.HELLO, self.node_id,
                                                 self.generation, 0, answer))
        skey = wf.session_key(self._key, f.sender, self.node_id, b["nonce"], ns)
        return f.sender, skey, token, resume

    async def _read_loop(self, client: int, skey: bytes, reader: _FrameReader,
                         conn: tuple[trio.CancelScope, trio.Event], token: bytes | None,
                         resume: int) -> None:
        """Deliver the client's frames in order. The n-th data frame here is message
        `resume + n` of its stream: one an older connection already delivered is
        skipped, so a resumed stream delivers each message once."""
        expect = 1
        number = resume
        stream = _InStream(token)    # replaced by the kept one once confirmed
        acks = _AckState(told=resume, carried=resume)
        async with trio.open_nursery() as nursery:
            while True:
                for data in await reader.read_batch():
                    f = wf.decode(skey, data, max_frame=self.config.max_frame)
                    if f.sender != client:
                        raise WireError(
                            f"frame claims sender {f.sender} on node {client}'s connection")
                    if f.seq != expect:
                        raise WireError(
                            f"sequence {f.seq} from node {client}, expected {expect}")
                    expect += 1
                    if expect == 2:
                        stream, older = self._session_confirmed(client, conn, token)
                        # The older connection may have handed a message over whose
                        # count it has not written yet (its send completed just before
                        # the cancel): deliver nothing until it is over.
                        await older.wait()
                        nursery.start_soon(self._send_acks, reader.sock, skey, stream, acks)
                    if f.type == MsgType.HELLO:
                        continue
                    number += 1
                    acks.carried = number
                    if number <= stream.delivered:
                        self.duplicates += 1
                        continue
                    if number != stream.delivered + 1:
                        raise WireError(f"message {number} from node {client}, "
                                        f"{stream.delivered} delivered")
                    self.frames_in += 1
                    await self._deliver(Envelope(client, f.generation, f.type, f.body))
                    stream.delivered = number
                if acks.confirmable(stream) > 0:
                    acks.wake.set()

    def _session_confirmed(self, client: int, conn: tuple[trio.CancelScope, trio.Event],
                           token: bytes | None) -> tuple[_InStream, trio.Event]:
        """The client proved the session key: its connection replaces an older one
        (returned: the event set once that one's task is over), and its stream (kept,
        or new) is the one this connection delivers."""
        older = trio.Event()
        older.set()
        old = self._current_in.get(client)
        if old is not None:
            old[0].cancel()   # the newer authenticated connection wins
            older = old[1]
        self._current_in[client] = conn
        peer = self._peers[client]
        if peer.state == "down":
            peer.wake.set()   # it is back: retry our side now, not after backoff
        stream = self._in_streams.get(client)
        if stream is None or stream.token != token or token is None:
            stream = _InStream(token)
            if token is not None:
                self._in_streams[client] = stream
        return stream, older

    async def _send_acks(self, sock: socket.socket, skey: bytes, stream: _InStream,
                         acks: _AckState) -> None:
        """Tell the client what its stream delivered here, so it can forget it:
        at once after ACK_EVERY messages, else ACK_DELAY after the first one."""
        seq = 0
        while True:
            while acks.confirmable(stream) <= 0:
                await acks.wake.wait()
                acks.wake = trio.Event()
            with trio.move_on_after(ACK_DELAY):
                while acks.confirmable(stream) < ACK_EVERY:
                    await acks.wake.wait()
                    acks.wake = trio.Event()
            seq += 1
            acks.told += acks.confirmable(stream)
            await _send_all(sock, wf.encode_prefixed(skey, MsgType.HELLO, self.node_id,
                                                     self.generation, seq,
                                                     {"ack": acks.told}))

    async def _deliver(self, env: Envelope) -> None:
        """Hand a frame to its handler: at once when it is inline and nothing of its
        sender is still being handled (no task switch), else through the lane."""
        inline = self._inline.get(env.type)
        lane = self._lane(env.sender)
        if inline is not None and lane.pending == 0:
            self._run_inline(inline, env)
            return
        lane.pending += 1
        try:
            lane.inbox.send_nowait(env)
        except trio.WouldBlock:
            try:
                await lane.inbox.send(env)       # the lane is full: wait (backpressure)
            except BaseException:
                lane.pending -= 1
                raise

    def _lane(self, sender: int) -> _Lane:
        lane = self._lanes.get(sender)
        if lane is None:
            assert self._nursery is not None
            send, recv = trio.open_memory_channel[Envelope](INBOX_DEPTH)
            lane = self._lanes[sender] = _Lane(send)
            self._nursery.start_soon(self._dispatch_loop, sender, lane, recv)
        return lane

    def _deliver_nowait(self, env: Envelope) -> None:
        # Through the lane even for an inline handler: the caller may be a handler.
        lane = self._lane(env.sender)
        try:
            lane.inbox.send_nowait(env)
        except trio.WouldBlock:
            raise PeerUnreachable(f"node {self.node_id}: own inbox full") from None
        lane.pending += 1

    async def _dispatch_loop(self, sender: int, lane: _Lane,
                             recv: trio.MemoryReceiveChannel[Envelope]) -> None:
        async for env in recv:
            try:
                inline = self._inline.get(env.type)
                handler = self._handlers.get(env.type)
                if inline is not None:
                    self._run_inline(inline, env)
                elif handler is not None:
                    await self._run_async(handler, env)
                else:
                    log.debug("node %d: no handler for type %d from %d", self.node_id,
                              env.type, sender)
            finally:
                lane.pending -= 1

    async def _run_async(self, handler: Handler, env: Envelope) -> None:
        try:
            await handler(env)
        except Exception:
            log.exception(_HANDLER_FAILED, self.node_id, self.generation, env.type, env.sender)

    def _run_inline(self, handler: InlineHandler, env: Envelope) -> None:
        try:
            handler(env)
        except Exception:
            log.exception(_HANDLER_FAILED, self.node_id, self.generation, env.type, env.sender)


@asynccontextmanager
async def open_tcp_endpoint(config: ClusterConfig, node_id: int):  # type: ignore[no-untyped-def]
    """Run a TcpEndpoint for the duration of the block; cancels it on exit."""
    ep = TcpEndpoint(config, node_id)
    async with trio.open_nursery() as nursery:
        await nursery.start(ep.serve)
        try:
            yield ep
        finally:
            nursery.cancel_scope.cancel()


def _refused(exc: BaseException) -> bool:
    """The connect failed only because the peer's host refused it (ECONNREFUSED on
    every address tried; trio gathers them under the OSError it raises)."""
    if isinstance(exc, ConnectionRefusedError):
        return True
    inner = exc.__cause__
    if isinstance(inner, BaseExceptionGroup):
        return all(_refused(e) for e in inner.exceptions)
    return inner is not None and _refused(inner)


def _why(exc: BaseException) -> str:
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(_why(e) for e in exc.exceptions)
    return str(exc) or type(exc).__name__


def _peername(sock: socket.socket, client: int) -> str:
    try:
        host, port = sock.getpeername()[:2]
        addr = f"{host}:{port}"
    except OSError:
        addr = "?"
    return f"{addr} (node {client})" if client >= 0 else addr


__all__ = ["TcpEndpoint", "TcpStatistics", "open_tcp_endpoint"]
