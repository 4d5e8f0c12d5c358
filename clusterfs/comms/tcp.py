"""The TCP transport: one node's Endpoint (clusterfs.comms.interface) over trio TCP.

Shape:
- every node listens on its configured address;
- for every other configured node it keeps ONE outgoing connection, fed by a
  bounded per-peer send queue and driven by one task (connect, handshake, write,
  reconnect with exponential backoff). Incoming connections only carry frames
  toward this node, so there is never a duplicate-connection race;
- incoming frames are handed to a per-sender inbox served by one task, so the
  handlers for one sender run one at a time in arrival order, while different
  senders proceed independently.

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

`send_nowait()` (and `send()`, the same for coroutines) never blocks: it raises
PeerUnreachable when the destination is not a configured node, when the last
connection attempt to it failed (the peer is "down"; a background task keeps
retrying with backoff), or when its queue is full. Messages queued when a
connection breaks are dropped with it (so they never reach a restarted process
at the other end); nothing is ever reordered.
"""

from __future__ import annotations

import logging
import secrets
import socket
from collections.abc import Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import trio

from clusterfs.comms.interface import Envelope, Handler
from clusterfs.config import ClusterConfig
from clusterfs.errors import PeerUnreachable, WireError
from clusterfs.wire import frame as wf
from clusterfs.wire.types import MsgType

log = logging.getLogger(__name__)

QUEUE_DEPTH = 10_000
INBOX_DEPTH = 1_000
BACKOFF_MIN = 0.05
BACKOFF_MAX = 1.0
NONCE_SIZE = 16
MAX_HANDSHAKING = 256      # connections still in their handshake; more are refused


class _Closed(Exception):
    """The other side closed the stream."""


class _FrameReader:
    def __init__(self, stream: trio.abc.ReceiveStream, max_frame: int) -> None:
        self.stream = stream
        self.max_frame = max_frame
        self.buf = bytearray()

    async def _fill(self, n: int) -> None:
        while len(self.buf) < n:
            data = await self.stream.receive_some(65536)
            if not data:
                raise _Closed()
            self.buf += data

    async def read(self) -> bytes:
        await self._fill(4)
        (n,) = wf.LENGTH.unpack_from(self.buf)
        wf.check_length(n, self.max_frame)
        await self._fill(4 + n)
        data = bytes(self.buf[4:4 + n])
        del self.buf[:4 + n]
        return data


@dataclass
class PeerStats:
    node_id: int
    state: str
    queued: int
    sent: int
    dropped: int
    connects: int
    connect_failures: int


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


@dataclass
class _Peer:
    node_id: int
    host: str
    port: int
    send_q: trio.MemorySendChannel[tuple[int, int, bytes]]
    recv_q: trio.MemoryReceiveChannel[tuple[int, int, bytes]]
    state: str = "connecting"      # connecting | up | down
    sent: int = 0
    dropped: int = 0
    connects: int = 0
    connect_failures: int = 0
    wake: trio.Event = field(default_factory=trio.Event)


class TcpEndpoint:
    """One node's TCP door. Run `serve()` in a nursery (or use open_tcp_endpoint)."""

    def __init__(self, config: ClusterConfig, node_id: int) -> None:
        self.config = config
        self.node_id = node_id
        self.generation = 0
        self.me = config.node(node_id)
        self._key = config.key
        self._handlers: dict[int, Handler] = {}
        self._peers: dict[int, _Peer] = {}
        for n in config.nodes:
            if n.id != node_id:
                s, r = trio.open_memory_channel[tuple[int, int, bytes]](QUEUE_DEPTH)
                self._peers[n.id] = _Peer(n.id, n.host, n.port, s, r)
        self._inboxes: dict[int, trio.MemorySendChannel[Envelope]] = {}
        self._current_in: dict[int, trio.CancelScope] = {}
        self._nursery: trio.Nursery | None = None
        self.frames_in = 0
        self.frames_out = 0
        self.wire_errors = 0
        self.handshake_failures = 0
        self.connections_in = 0
        self.refused = 0
        self._handshaking = 0
        self.listen_port: int | None = None

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
        if peer.state == "down":
            raise PeerUnreachable(f"node {dest} unreachable from {self.node_id}")
        try:
            peer.send_q.send_nowait((int(mtype), self.generation, packed))
        except trio.WouldBlock:
            peer.dropped += 1
            raise PeerUnreachable(f"node {dest}: send queue full") from None
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            raise PeerUnreachable(f"node {dest}: endpoint closed") from None

    def register(self, mtypes: Iterable[int], handler: Handler) -> None:
        for t in mtypes:
            self._handlers[int(t)] = handler

    # -- introspection ---------------------------------------------------------
    def peer_state(self, dest: int) -> str:
        return self._peers[dest].state

    def statistics(self) -> TcpStatistics:
        return TcpStatistics(
            self.node_id, self.generation, self.frames_in, self.frames_out, self.wire_errors,
            self.handshake_failures, self.connections_in, self.refused,
            [PeerStats(p.node_id, p.state, p.recv_q.statistics().current_buffer_used, p.sent,
                       p.dropped, p.connects, p.connect_failures)
             for p in self._peers.values()])

    # -- running ---------------------------------------------------------------
    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                    ) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            listeners = await trio.open_tcp_listeners(self.me.port, host=self.me.host)
            self.listen_port = listeners[0].socket.getsockname()[1]
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
                stream, skey = await self._connect(peer)
            except (OSError, WireError, trio.TooSlowError, _Closed,
                    trio.BrokenResourceError) as exc:
                peer.connect_failures += 1
                if peer.state != "down":
                    log.info("node %d gen %d: peer %d down: %s", self.node_id,
                             self.generation, peer.node_id, _why(exc))
                peer.state = "down"
                self._drop_queue(peer)
                peer.wake = trio.Event()
                with trio.move_on_after(backoff):
                    await peer.wake.wait()      # set when the peer connects to us
                backoff = min(backoff * 2, BACKOFF_MAX)
                continue
            backoff = BACKOFF_MIN
            peer.connects += 1
            peer.state = "up"
            log.info("node %d gen %d: connected to peer %d", self.node_id, self.generation,
                     peer.node_id)
            try:
                async with stream, trio.open_nursery() as n:
                    n.start_soon(self._watch_eof, stream)
                    await self._write_loop(peer, stream, skey)
            except* (OSError, trio.BrokenResourceError, trio.ClosedResourceError,
                     _Closed) as exc:
                # except*: trio wraps what the nursery's tasks raised in an ExceptionGroup
                log.info("node %d gen %d: connection to peer %d lost: %s", self.node_id,
                         self.generation, peer.node_id, _why(exc))
            # What was queued for the process at the other end is dropped with the
            # connection: it must never reach a restarted process on the next one.
            self._drop_queue(peer)
            peer.state = "connecting"

    async def _connect(self, peer: _Peer) -> tuple[trio.SocketStream, bytes]:
        with trio.fail_after(self.config.connect_timeout):
            stream = await trio.open_tcp_stream(peer.host, peer.port)
            # A link that goes dead under an open connection (a cable pulled, a
            # partition) must break it: TCP would otherwise retransmit with a backoff
            # that reaches tens of seconds, and after the link is back the peers would
            # go on not hearing each other that long. Data unacknowledged for a failure
            # timeout aborts the connection; we then dial again (with our own backoff).
            stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT,
                              int(self.config.failure_timeout * 1000))
            try:
                nc = secrets.token_bytes(NONCE_SIZE)
                hello = {"cluster": self.config.name, "to": peer.node_id, "nonce": nc}
                await stream.send_all(wf.encode_prefixed(self._key, MsgType.HELLO,
                                                         self.node_id, self.generation, 0, hello))
                f = wf.decode(self._key, await _FrameReader(stream, self.config.max_frame).read(),
                              max_frame=self.config.max_frame)
                b = f.body
                if (f.type != MsgType.HELLO or f.sender != peer.node_id or f.seq != 0
                        or not isinstance(b, dict) or b.get("echo") != nc
                        or b.get("to") != self.node_id or b.get("cluster") != self.config.name
                        or not isinstance(b.get("nonce"), bytes)):
                    raise WireError(f"bad handshake answer from {peer.host}:{peer.port}")
                skey = wf.session_key(self._key, self.node_id, peer.node_id, nc, b["nonce"])
                return stream, skey
            except BaseException:
                await trio.aclose_forcefully(stream)
                raise

    async def _write_loop(self, peer: _Peer, stream: trio.SocketStream, skey: bytes) -> None:
        seq = 1
        await stream.send_all(wf.encode_prefixed(skey, MsgType.HELLO, self.node_id,
                                                 self.generation, seq, None))
        while True:
            mtype, gen, packed = await peer.recv_q.receive()
            seq += 1
            await stream.send_all(wf.encode_prefixed(skey, mtype, self.node_id, gen, seq,
                                                     None, packed_body=packed))
            peer.sent += 1
            self.frames_out += 1

    @staticmethod
    async def _watch_eof(stream: trio.SocketStream) -> None:
        # The server never writes after the handshake: any byte, EOF or error ends us.
        await stream.receive_some(1)
        raise _Closed()

    def _drop_queue(self, peer: _Peer) -> None:
        while True:
            try:
                peer.recv_q.receive_nowait()
            except trio.WouldBlock:
                return
            peer.dropped += 1

    # -- receiving side --------------------------------------------------------
    async def _serve_conn(self, stream: trio.SocketStream) -> None:
        self.connections_in += 1
        client = -1
        scope = trio.CancelScope()
        if self._handshaking >= MAX_HANDSHAKING:
            self.refused += 1
            log.warning("node %d gen %d: %d handshakes in progress; refusing %s",
                        self.node_id, self.generation, self._handshaking,
                        _peername(stream, client))
            await trio.aclose_forcefully(stream)
            return
        try:
            with scope:
                reader = _FrameReader(stream, self.config.max_frame)
                self._handshaking += 1
                try:
                    with trio.fail_after(self.config.connect_timeout):
                        client, skey = await self._accept_handshake(stream, reader)
                except WireError:
                    self.handshake_failures += 1
                    raise
                finally:
                    self._handshaking -= 1
                await self._read_loop(client, skey, reader, scope)
        except* WireError as exc:
            self.wire_errors += 1
            log.warning("node %d gen %d: dropped connection from %s: %s", self.node_id,
                        self.generation, _peername(stream, client), _why(exc))
        except* (_Closed, OSError, trio.BrokenResourceError, trio.ClosedResourceError,
                 trio.TooSlowError) as exc:
            log.debug("node %d: incoming connection from %s ended: %s", self.node_id,
                      _peername(stream, client), _why(exc))
        finally:
            if self._current_in.get(client) is scope:
                del self._current_in[client]
            await trio.aclose_forcefully(stream)

    async def _accept_handshake(self, stream: trio.SocketStream,
                                reader: _FrameReader) -> tuple[int, bytes]:
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
        ns = secrets.token_bytes(NONCE_SIZE)
        answer = {"cluster": self.config.name, "to": f.sender, "nonce": ns, "echo": b["nonce"]}
        await stream.send_all(wf.encode_prefixed(self._key, MsgType.HELLO, self.node_id,
                                                 self.generation, 0, answer))
        return f.sender, wf.session_key(self._key, f.sender, self.node_id, b["nonce"], ns)

    async def _read_loop(self, client: int, skey: bytes, reader: _FrameReader,
                         scope: trio.CancelScope) -> None:
        expect = 1
        while True:
            f = wf.decode(skey, await reader.read(), max_frame=self.config.max_frame)
            if f.sender != client:
                raise WireError(f"frame claims sender {f.sender} on node {client}'s connection")
            if f.seq != expect:
                raise WireError(f"sequence {f.seq} from node {client}, expected {expect}")
            expect += 1
            if expect == 2:
                old = self._current_in.get(client)
                if old is not None:
                    old.cancel()   # the newer authenticated connection wins
                self._current_in[client] = scope
                peer = self._peers[client]
                if peer.state == "down":
                    peer.wake.set()   # it is back: retry our side now, not after backoff
            if f.type == MsgType.HELLO:
                continue
            self.frames_in += 1
            await self._inbox(client).send(Envelope(client, f.generation, f.type, f.body))

    def _inbox(self, sender: int) -> trio.MemorySendChannel[Envelope]:
        ch = self._inboxes.get(sender)
        if ch is None:
            assert self._nursery is not None
            ch, recv = trio.open_memory_channel[Envelope](INBOX_DEPTH)
            self._inboxes[sender] = ch
            self._nursery.start_soon(self._dispatch_loop, sender, recv)
        return ch

    def _deliver_nowait(self, env: Envelope) -> None:
        try:
            self._inbox(env.sender).send_nowait(env)
        except trio.WouldBlock:
            raise PeerUnreachable(f"node {self.node_id}: own inbox full") from None

    async def _dispatch_loop(self, sender: int,
                             recv: trio.MemoryReceiveChannel[Envelope]) -> None:
        async for env in recv:
            handler = self._handlers.get(env.type)
            if handler is None:
                log.debug("node %d: no handler for type %d from %d", self.node_id, env.type,
                          sender)
                continue
            try:
                await handler(env)
            except Exception:
                log.exception("node %d gen %d: handler for type %d from node %d failed",
                              self.node_id, self.generation, env.type, sender)


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


def _why(exc: BaseException) -> str:
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(_why(e) for e in exc.exceptions)
    return str(exc) or type(exc).__name__


def _peername(stream: trio.SocketStream, client: int) -> str:
    try:
        host, port = stream.socket.getpeername()[:2]
        addr = f"{host}:{port}"
    except OSError:
        addr = "?"
    return f"{addr} (node {client})" if client >= 0 else addr


__all__ = ["TcpEndpoint", "TcpStatistics", "open_tcp_endpoint"]
