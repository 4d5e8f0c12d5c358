"""The TCP transport over real sockets on 127.0.0.1, inside one trio run."""

from __future__ import annotations

import dataclasses
import socket
import struct
from contextlib import asynccontextmanager

import pytest
import trio
from trioutil import trio_test, wait_until

from clusterfs.comms.interface import Envelope
from clusterfs.comms.localcluster import local_config
from clusterfs.comms.tcp import open_tcp_endpoint
from clusterfs.errors import PeerUnreachable
from clusterfs.wire import frame as wf
from clusterfs.wire.types import MsgType

T = MsgType.BARRIER


async def send_until_delivered(ep, dest, got, body, timeout=5.0):
    """Send repeatedly (peer may still be connecting) until `got` is non-empty."""
    with trio.fail_after(timeout):
        while not got:
            try:
                await ep.send(dest, T, body)
            except PeerUnreachable:
                pass
            await trio.sleep(0.05)


@trio_test
async def test_ordered_delivery_and_envelope():
    cfg = local_config([1, 2])
    got: list[Envelope] = []

    async def handler(env):
        got.append(env)

    async with open_tcp_endpoint(cfg, 1) as a, open_tcp_endpoint(cfg, 2) as b:
        b.register([T], handler)
        a.generation = 7
        await send_until_delivered(a, 2, got, {"warmup": True})
        got.clear()
        for i in range(3000):
            await a.send(2, T, {"i": i, "r": ("x", i)})
        await wait_until(lambda: len(got) == 3000)
        assert [e.body["i"] for e in got] == list(range(3000))
        assert all(e.sender == 1 and e.generation == 7 and e.type == T for e in got)
        assert got[5].body["r"] == ("x", 5)
        st = a.statistics()
        assert st.frames_out >= 3000 and st.peers[0].state == "up"
        assert b.statistics().frames_in >= 3000 and b.statistics().wire_errors == 0


@trio_test
async def test_handlers_for_one_sender_run_one_at_a_time():
    cfg = local_config([1, 2, 3])
    running: dict[int, int] = {1: 0, 3: 0}
    peak: dict[int, int] = {1: 0, 3: 0}
    order: dict[int, list[int]] = {1: [], 3: []}
    both_overlapped = trio.Event()

    async def handler(env):
        running[env.sender] += 1
        peak[env.sender] = max(peak[env.sender], running[env.sender])
        if running[1] and running[3]:
            both_overlapped.set()   # different senders do run concurrently
        await trio.sleep(0.002)
        order[env.sender].append(env.body)
        running[env.sender] -= 1

    async with (open_tcp_endpoint(cfg, 1) as a, open_tcp_endpoint(cfg, 2) as b,
                open_tcp_endpoint(cfg, 3) as c):
        b.register([T], handler)
        for ep in (a, c):
            await wait_until(lambda ep=ep: ep.peer_state(2) == "up", timeout=5)
        for i in range(100):
            await a.send(2, T, i)
            await c.send(2, T, i)
        await wait_until(lambda: len(order[1]) == 100 and len(order[3]) == 100)
        assert order[1] == list(range(100)) and order[3] == list(range(100))
        assert peak == {1: 1, 3: 1}
        assert both_overlapped.is_set()


@trio_test
async def test_send_to_self_and_unknown():
    cfg = local_config([1, 2])
    got = []

    async def handler(env):
        got.append(env)

    async with open_tcp_endpoint(cfg, 1) as a:
        a.register([T], handler)
        await a.send(1, T, [1, 2])
        await wait_until(lambda: got)
        assert got[0].sender == 1 and got[0].body == (1, 2)
        with pytest.raises(PeerUnreachable):
            await a.send(99, T, None)
        # node 2 is configured but not running: it goes down and sends fail fast
        await wait_until(lambda: a.peer_state(2) == "down")
        with pytest.raises(PeerUnreachable):
            await a.send(2, T, None)


@trio_test
async def test_reconnect_after_peer_restart():
    """What was kept for a process that is gone never reaches the one that restarts
    at its address: the new process's epoch differs, and the old stream is dropped."""
    cfg = local_config([1, 2])
    got: list[Envelope] = []

    async def handler(env):
        got.append(env)

    async with open_tcp_endpoint(cfg, 1) as a:
        async with open_tcp_endpoint(cfg, 2) as b:
            b.register([T], handler)
            await send_until_delivered(a, 2, got, "first life")
        # node 2 is gone: the connection breaks and node 1 marks it down; a peer once
        # reached keeps queuing (its process may come back on the next connection)
        await wait_until(lambda: a.peer_state(2) == "down")
        await a.send(2, T, "for the first life only")
        got.clear()
        async with open_tcp_endpoint(cfg, 2) as b2:
            b2.register([T], handler)
            await wait_until(lambda: a.peer_state(2) == "up")
            for i in range(50):
                await a.send(2, T, i)
            await wait_until(lambda: len(got) == 50)
            await trio.sleep(0.1)
            assert [e.body for e in got] == list(range(50))
        assert a.statistics().peers[0].connects == 2


@trio_test
async def test_a_peer_whose_port_refuses_is_reported_refused_until_it_is_back():
    """A peer process that is gone leaves nothing listening at its address: its host
    refuses our connect, which is reported (refused_at), and forgotten once a
    connection succeeds again. A peer we have never tried is not refused."""
    cfg = local_config([1, 2])
    told: list[tuple[int, float]] = []
    async with open_tcp_endpoint(cfg, 1) as a:
        a.on_refused(lambda dest: told.append((dest, a.refused_at(dest))))
        async with open_tcp_endpoint(cfg, 2):
            await wait_until(lambda: a.peer_state(2) == "up")
            assert a.refused_at(2) is None
        before = trio.current_time()
        await wait_until(lambda: a.refused_at(2) is not None)
        assert a.refused_at(2) >= before
        # the listener heard of it the moment it was recorded (membership acts on it)
        assert told and told[0][0] == 2 and told[0][1] is not None
        async with open_tcp_endpoint(cfg, 2):
            await wait_until(lambda: a.peer_state(2) == "up")
            assert a.refused_at(2) is None
        assert a.refused_at(3) is None


@trio_test
async def test_wrong_key_cannot_connect_and_bad_frames_are_dropped():
    cfg = local_config([1, 2])
    bad = dataclasses.replace(cfg, key=bytes(32))
    got = []

    async def handler(env):
        got.append(env)

    async with open_tcp_endpoint(cfg, 2) as b:
        b.register([T], handler)
        async with open_tcp_endpoint(bad, 1) as intruder:
            await wait_until(lambda: intruder.peer_state(2) == "down")
        assert b.statistics().handshake_failures >= 1 and not got
        # a raw connection sending garbage is dropped; the node keeps serving
        stream = await trio.open_tcp_stream("127.0.0.1", cfg.node(2).port)
        await stream.send_all(wf.LENGTH.pack(100) + b"\x01" * 100)
        with trio.fail_after(5):
            assert await stream.receive_some(10) == b""   # closed on us
        await stream.aclose()
        async with open_tcp_endpoint(cfg, 1) as a:
            await send_until_delivered(a, 2, got, "still serving")
        assert got[0].body == "still serving"
        assert b.statistics().wire_errors >= 2


@trio_test
async def test_silent_connections_time_out_and_are_capped(monkeypatch):
    from clusterfs.comms import tcp

    monkeypatch.setattr(tcp, "MAX_HANDSHAKING", 5)
    cfg = local_config([1, 2])
    got = []

    async def handler(env):
        got.append(env)

    async with open_tcp_endpoint(cfg, 2) as b:
        b.register([T], handler)
        silent = [await trio.open_tcp_stream("127.0.0.1", cfg.node(2).port) for _ in range(8)]
        await wait_until(lambda: b.statistics().refused >= 3)
        # the silent ones are closed after connect_timeout (1 s here)
        with trio.fail_after(5):
            for s in silent:
                while await s.receive_some(10):
                    pass
        for s in silent:
            await s.aclose()
        async with open_tcp_endpoint(cfg, 1) as a:
            await send_until_delivered(a, 2, got, "after the storm")
        assert b.statistics().connections_in >= 9


@trio_test
async def test_send_nowait_keeps_the_order_of_the_calls_across_tasks():
    """send_nowait queues at the call: two tasks taking turns reach the peer in the
    order of their calls (the DLM relies on it instead of a queue of its own)."""
    cfg = local_config([1, 2])
    got: list[Envelope] = []

    async def handler(env):
        got.append(env)

    async with open_tcp_endpoint(cfg, 1) as a, open_tcp_endpoint(cfg, 2) as b:
        b.register([T], handler)
        await send_until_delivered(a, 2, got, "warmup")
        got.clear()
        calls: list[int] = []

        async def sender(first: int) -> None:
            for i in range(first, 400, 2):
                a.send_nowait(2, T, i)
                calls.append(i)
                await trio.lowlevel.checkpoint()

        async with trio.open_nursery() as n:
            n.start_soon(sender, 0)
            n.start_soon(sender, 1)
        await wait_until(lambda: len(got) == 400)
        assert [e.body for e in got] == calls
        with pytest.raises(PeerUnreachable):
            a.send_nowait(99, T, None)


@trio_test
async def test_inline_handlers_keep_order_and_one_at_a_time_with_async_ones():
    """An inline handler runs as its frame arrives only when nothing of that sender
    is still being handled: mixed with a slow async handler, every message of one
    sender is still handled in arrival order and never two at once."""
    cfg = local_config([1, 2])
    SLOW, FAST = MsgType.BARRIER, MsgType.DLM_QUERY
    order: list[int] = []
    running = 0
    overlaps = 0

    async def slow(env):
        nonlocal running, overlaps
        running += 1
        overlaps += running > 1
        await trio.sleep(0.001)
        order.append(env.body)
        running -= 1

    def fast(env):
        nonlocal overlaps
        overlaps += running > 0
        order.append(env.body)

    async with open_tcp_endpoint(cfg, 1) as a, open_tcp_endpoint(cfg, 2) as b:
        b.register([SLOW], slow)
        b.register_inline([FAST], fast)
        await send_until_delivered(a, 2, order, -1)
        order.clear()
        for i in range(300):
            a.send_nowait(2, SLOW if i % 7 == 0 else FAST, i)
            if i % 50 == 0:
                await trio.sleep(0.01)     # some arrive while the lane is idle
        await wait_until(lambda: len(order) == 300)
        assert order == list(range(300))
        assert overlaps == 0


@trio_test
async def test_a_burst_larger_than_the_socket_buffers_arrives_whole_and_in_order():
    """send_nowait writes straight to the socket until the kernel refuses more; the
    rest waits for the writer, and later messages queue behind it."""
    cfg = local_config([1, 2])
    got: list[int] = []
    blob = b"x" * 20_000

    async def handler(env):
        got.append(env.body[0])
        await trio.sleep(0)       # a slow reader: its lane fills, TCP pushes back

    async with open_tcp_endpoint(cfg, 1) as a, open_tcp_endpoint(cfg, 2) as b:
        b.register([T], handler)
        await send_until_delivered(a, 2, got, (-1, b""))
        got.clear()
        dropped = a.statistics().peers[0].dropped
        for i in range(2000):          # 40 MB without yielding once
            a.send_nowait(2, T, (i, blob))
        assert a.statistics().peers[0].queued > 0     # the kernel did not take it all
        await wait_until(lambda: len(got) == 2000, timeout=30)
        assert got == list(range(2000))
        assert a.statistics().peers[0].dropped == dropped


@trio_test
async def test_a_write_that_fails_breaks_the_connection_and_the_next_one_carries_it():
    """A frame whose write failed is not lost: the peer's process is the same, so
    the next connection writes it again, before anything newer."""
    cfg = local_config([1, 2])
    got: list[Envelope] = []

    async def handler(env):
        got.append(env)

    async with open_tcp_endpoint(cfg, 1) as a, open_tcp_endpoint(cfg, 2) as b:
        b.register([T], handler)
        await send_until_delivered(a, 2, got, "first")
        await wait_until(lambda: a.statistics().peers[0].unacked == 0)
        got.clear()
        dropped = a.statistics().peers[0].dropped     # (sends before the first connect)
        link = a._peers[2].link
        link.sock.shutdown(socket.SHUT_WR)      # the next write fails (EPIPE)
        a.send_nowait(2, T, "written on a broken connection")
        assert link.broken is not None
        a.send_nowait(2, T, "second")
        await wait_until(lambda: len(got) == 2)
        await trio.sleep(0.1)
        assert [e.body for e in got] == ["written on a broken connection", "second"]
        assert a.statistics().peers[0].connects == 2
        assert a.statistics().peers[0].dropped == dropped


def reset_from_underneath(ep, dest: int) -> None:
    """Break ep's connection to dest as a network would: a reset (SO_LINGER 0), with
    whatever the kernel still held on either side thrown away."""
    sock = ep._peers[dest].link.sock
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    trio.lowlevel.notify_closing(sock)
    sock.close()


@asynccontextmanager
async def linked_pair():
    """Endpoints of nodes 1 and 2, node 2 putting every message body it gets in a list,
    once a first message (-1) went through: (a, b, got)."""
    cfg = local_config([1, 2])
    got: list = []

    async def handler(env):
        got.append(env.body)

    async with open_tcp_endpoint(cfg, 1) as a, open_tcp_endpoint(cfg, 2) as b:
        b.register([T], handler)
        await send_until_delivered(a, 2, got, -1)
        yield a, b, got


@trio_test
async def test_connections_reset_under_a_stream_lose_nothing_and_repeat_nothing():
    """Both processes live on while their connection is reset again and again in the
    middle of a stream: every message arrives once, in order (sent again from where
    the receiver's process stopped). Before reliable delivery, each reset dropped
    what was queued and in flight."""
    async with linked_pair() as (a, _b, got):
        got.clear()
        dropped = a.statistics().peers[0].dropped     # (sends before the first connect)
        n = 0
        broken = None
        for _ in range(8):
            # a connection of its own each time (not the one just reset)
            await wait_until(lambda old=broken: a._peers[2].link not in (None, old))
            broken = a._peers[2].link
            for _ in range(500):
                a.send_nowait(2, T, n)
                n += 1
            await trio.sleep(0.002)
            reset_from_underneath(a, 2)
            for _ in range(100):           # queued while it reconnects
                a.send_nowait(2, T, n)
                n += 1
        await wait_until(lambda: len(got) >= n, timeout=10)
        await trio.sleep(0.2)
        assert got == list(range(n))
        st = a.statistics().peers[0]
        assert st.connects == 9 and st.dropped == dropped and st.resent > 0
        await wait_until(lambda: a.statistics().peers[0].unacked == 0)


@trio_test
async def test_the_receiver_acknowledges_so_the_sender_forgets():
    async with linked_pair() as (a, _b, got):
        for i in range(1000):
            a.send_nowait(2, T, i)
            if i % 100 == 0:
                await trio.sleep(0)
        await wait_until(lambda: len(got) == 1001)
        # acknowledged within ACK_DELAY of the last one
        await wait_until(lambda: a.statistics().peers[0].unacked == 0, timeout=1)


async def raw_session(cfg, me: int, target: int) -> tuple[trio.SocketStream, bytes]:
    """A hand-made client: the handshake of node `me` with `target`, its session key."""
    import os

    stream = await trio.open_tcp_stream("127.0.0.1", cfg.node(target).port)
    nc = os.urandom(16)
    hello = {"cluster": cfg.name, "to": target, "nonce": nc}
    await stream.send_all(wf.encode_prefixed(cfg.key, MsgType.HELLO, me, 0, 0, hello))
    buf = b""
    while len(buf) < 4 or len(buf) < 4 + wf.LENGTH.unpack_from(buf)[0]:
        buf += await stream.receive_some(4096)
    answer = wf.decode(cfg.key, buf[4:])
    return stream, wf.session_key(cfg.key, me, target, nc, answer.body["nonce"])


@trio_test
async def test_frames_before_a_bad_one_in_the_same_chunk_are_handled():
    """Frames are taken from a chunk in order; the first bad one closes the
    connection, and what came before it in that chunk was still delivered."""
    cfg = local_config([1, 2])
    got: list[Envelope] = []

    async def handler(env):
        got.append(env)

    async with open_tcp_endpoint(cfg, 2) as b:
        b.register([T], handler)
        stream, sk = await raw_session(cfg, 1, 2)
        frames = [wf.encode_prefixed(sk, MsgType.HELLO, 1, 0, 1, None),
                  wf.encode_prefixed(sk, T, 1, 0, 2, "good"),
                  wf.encode_prefixed(sk, T, 1, 0, 3, "good too"),
                  wf.LENGTH.pack(2**31) + b"\0" * 64]
        await stream.send_all(b"".join(frames))
        with trio.fail_after(5):
            while await stream.receive_some(10):
                pass                                  # closed on us
        await stream.aclose()
        await wait_until(lambda: len(got) == 2)
        assert [e.body for e in got] == ["good", "good too"]
        assert b.statistics().wire_errors == 1
