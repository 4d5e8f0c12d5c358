"""The block server's rules, one server in a thread of this process (tier 2): who may
write (members of its view, not an older life of a node), what a forged or
out-of-sequence frame does (closes that connection only), and a ProxyDevice's
round trip and refusal handling. Real mounts are in test_proxy.py."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import types
from collections.abc import Iterator

import pytest
import trio
import trio.testing

from clusterfs.comms.localcluster import free_ports
from clusterfs.config import parse_config
from clusterfs.errors import FenceError, StorageError
from clusterfs.membership.view import View, ViewChange
from clusterfs.storage import blockwire as bw
from clusterfs.storage.blockserver import BlockServer
from clusterfs.storage.device import BlockDevice
from clusterfs.storage.groupfence import StorageGroupFence
from clusterfs.storage.proxy import ProxyDevice, _Connection
from clusterfs.wire import frame as wf
from clusterfs.wire.types import MsgType

MIB = 1 << 20


class Views:
    """A membership whose views the test installs (from any thread)."""

    def __init__(self) -> None:
        self.view = View(1, frozenset({1, 3}), True, 3)
        self.send, self.recv = trio.open_memory_channel(100)
        self.send.send_nowait(ViewChange(self.view, self.view.members, frozenset()))

    def subscribe(self):
        return self.recv

    def install(self, token: trio.lowlevel.TrioToken, generation: int,
                members: set[int]) -> None:
        self.view = View(generation, frozenset(members), True, 3)
        trio.from_thread.run_sync(self.send.send_nowait,
                                  ViewChange(self.view, self.view.members, frozenset()),
                                  trio_token=token)


@dataclasses.dataclass
class Served:
    cfg: object
    server: BlockServer
    views: Views
    token: trio.lowlevel.TrioToken

    def install(self, generation: int, members: set[int]) -> None:
        self.views.install(self.token, generation, members)
        deadline = 100
        while self.server.generation != generation and deadline:   # it follows at once
            threading.Event().wait(0.01)
            deadline -= 1


def _config(group: list[int], io_timeout: float = 0.2):
    p = free_ports(5)
    return parse_config({
        "name": "t", "key": os.urandom(32).hex(),
        "node": [{"id": i, "address": f"127.0.0.1:{p[i - 1]}"} for i in (1, 2, 3)],
        "storage": {"group": group, "io_timeout": io_timeout,
                    "servers": {str(n): f"127.0.0.1:{p[2 + n]}" for n in group}}})


@contextlib.contextmanager
def _serving(cfg, node: int, dev) -> Iterator[Served]:
    """A BlockServer of `node` on `dev`, in a trio run on a thread of its own."""
    views = Views()
    server = BlockServer(cfg, node, dev, views)
    started = threading.Event()
    box: dict = {}

    async def main() -> None:
        box["token"] = trio.lowlevel.current_trio_token()
        async with trio.open_nursery() as nursery:
            box["cancel"] = nursery.cancel_scope
            await nursery.start(server.serve)
            started.set()

    thread = threading.Thread(target=trio.run, args=(main,), daemon=True)
    thread.start()
    assert started.wait(10)
    try:
        yield Served(cfg, server, views, box["token"])
    finally:
        trio.from_thread.run_sync(box["cancel"].cancel, trio_token=box["token"])
        thread.join(10)


def _image(tmp_path, name: str = "disk.img") -> str:
    image = tmp_path / name
    with open(image, "wb") as f:
        f.truncate(8 * MIB)
    return str(image)


@pytest.fixture
def served(tmp_path) -> Iterator[Served]:
    dev = BlockDevice(_image(tmp_path))
    try:
        with _serving(_config([1]), 1, dev) as s:
            yield s
    finally:
        dev.close()


def _proxy(s: Served, generation: int) -> ProxyDevice:
    dev = ProxyDevice(s.cfg, 3)
    dev.attach(lambda: (generation, frozenset({1, 3})))
    return dev


def test_a_member_reads_and_writes_through_the_server(served):
    dev = _proxy(served, 1)
    try:
        assert dev.size == 8 * MIB
        data = os.urandom(3 * MIB + 4096)                 # several requests
        dev.pwrite(4096, data)
        dev.flush()
        assert dev.pread(4096, len(data)) == data
        assert dev.read(1) == data[:4096]
        st = served.server.statistics()
        assert st["writes"] == 4 and st["flushes"] == 1
        # a server that finds itself stopped or starved (a loaded machine: CI beside a
        # soak) refuses writes for a moment by design, and the proxy retries them
        assert st["refused"] == 0 or st["stalls"] > 0, st
    finally:
        dev.close()


def test_a_block_written_since_the_flush_is_read_back_from_the_log(served):
    """A writer whose requests end inside a block (direct I/O splits at the page edges
    of the user's buffer) reads that block back at its next request: the proxy's
    re-send log has it, so no round trip; after a flush, or when the newest write of
    it covers only part, it comes from the server."""
    dev = _proxy(served, 1)
    try:
        old, new = os.urandom(4 * 4096), os.urandom(4096)
        dev.write_behind(0, old)
        dev.write_behind(2 * 4096, new)
        reads = dev.stats["reads"]
        assert dev.read_newest(2) == new and dev.read_newest(1) == old[4096:8192]
        assert dev.stats["reads"] == reads
        dev.write_behind(3 * 4096 + 100, b"xyz")               # part of block 3
        assert dev.read_newest(3) == old[3 * 4096 : 3 * 4096 + 100] + b"xyz" + \
            old[3 * 4096 + 103 :]
        dev.flush()
        assert dev.read_newest(0) == old[:4096]
        assert dev.stats["reads"] == reads + 2
    finally:
        dev.close()


def test_a_node_removed_from_the_view_is_refused_and_reads_go_on(served):
    dev = _proxy(served, 1)
    try:
        dev.pwrite(0, b"a" * 4096)
        served.install(2, {1})                            # node 3 removed
        with pytest.raises(StorageError, match="not a member of generation 2"):
            dev.pwrite(0, b"b" * 4096)
        assert dev.pread(0, 4096) == b"a" * 4096          # reads are still served
        assert served.server.statistics()["refused"] >= 1
    finally:
        dev.close()


def test_a_request_from_an_older_life_of_a_node_is_refused(served):
    served.install(2, {1})
    served.install(5, {1, 3})                             # node 3 joined again in 5
    old, new = _proxy(served, 3), _proxy(served, 5)
    try:
        with pytest.raises(StorageError, match="joined again in generation 5"):
            old.pwrite(0, b"old" * 1000)
        new.pwrite(0, b"new" * 1000)
        assert new.pread(0, 3000) == b"new" * 1000
    finally:
        old.close()
        new.close()


def test_a_forged_frame_closes_that_connection_only(served):
    good = _proxy(served, 1)
    host, port = served.cfg.block_server(1)
    try:
        with socket.create_connection((host, port), timeout=5) as raw:
            wrong = os.urandom(32)                        # not the cluster key
            raw.sendall(wf.encode_prefixed(wrong, MsgType.HELLO, 3, 0, 0,
                                           bw.hello("t", 1, bw.new_nonce())))
            assert raw.recv(100) == b""                   # closed on us
        good.pwrite(0, b"still" * 100)                    # the others are served
        assert good.pread(0, 500) == b"still" * 100
        assert served.server.statistics()["wire_errors"] == 1
    finally:
        good.close()


def test_no_server_answering_is_an_error_not_a_hang(served, tmp_path):
    cfg = dataclasses.replace(served.cfg, block_servers=((1, "127.0.0.1", free_ports(1)[0]),))
    with pytest.raises(StorageError, match="no block server left"):
        ProxyDevice(cfg, 3)


# -- fencing a node without a path: the servers cut it off (storage/groupfence.py) ----
def _group_fence(s: Served, me: int, generation: int, inner=None, kind: str = "scsi-pr"):
    fence = StorageGroupFence(s.cfg, me, inner, kind)
    fence.attach(lambda: (generation, frozenset({1, 2})), None)
    return fence


def test_a_node_without_a_path_is_fenced_by_the_servers_cutting_it_off(served):
    """Node 2 (the coordinator, say) fences proxy node 3, removed in view 3: server 1
    refuses node 3's writes of every older generation; reads go on, and a new life of
    node 3 (joined in a later view) writes again."""
    served.install(2, {1, 2, 3})
    dev = _proxy(served, 2)
    told: list[str] = []
    dev.on_fenced = told.append                          # the mount withdraws there
    try:
        dev.pwrite(0, b"before" * 100)
        trio.run(_group_fence(served, 2, 3).fence, 3, 3)
        assert served.server.statistics()["cut_off"] == {3: 3}
        with pytest.raises(StorageError, match="node 3 was fenced in generation 3"):
            dev.pwrite(0, b"stale!" * 100)
        assert told == ["node 3 was fenced in generation 3 (block server 1)"]
        with pytest.raises(StorageError, match="fenced"):
            dev.flush()                                   # refused here at once now
        assert dev.pread(0, 600) == b"before" * 100
        served.install(4, {1, 2, 3})                      # node 3 back, a new life
        again = _proxy(served, 4)
        again.pwrite(0, b"again!" * 100)
        again.close()
    finally:
        dev.close()


def test_the_cut_off_waits_for_the_victims_writes_in_flight(served):
    """A server answers a fence only once no write of the victim is under way: one
    that passed the checks before the fence may still land, but not after it."""
    server = BlockServer(served.cfg, 1, served.server.dev, Views())
    order: list[str] = []

    server._install(1, frozenset({1, 3}), True)

    async def main() -> None:
        server._inflight[3] = 1                           # a write of node 3 under way
        async with trio.open_nursery() as n:
            async def fence() -> None:
                await server.cut_off_node(3, 7)
                order.append("fenced")
            n.start_soon(fence)
            await trio.testing.wait_all_tasks_blocked()
            order.append("write done")
            server._inflight.pop(3)
            server._io_done.set()
        assert "fenced in generation 7" in server.refusal(3, 6)
        assert server.refusal(3, 7) is None               # a life after the fence

    trio.run(main)
    assert order == ["write done", "fenced"]


def test_a_fencer_without_a_path_has_a_server_preempt_for_it(served):
    """scsi-pr: a node with a path is fenced on the LUN. A fencer without one (no
    session there) asks a live server, which fences through its own node's agent;
    not a node that joined again since, and not the server itself."""
    served.install(2, {1, 2, 3})
    asked: list[tuple[int, int]] = []

    async def preempt(node: int, generation: int) -> None:
        asked.append((node, generation))

    served.server.fence_disk_node = preempt
    cfg = dataclasses.replace(served.cfg, storage_group=(1, 4))      # 4: a disk node
    fence = StorageGroupFence(cfg, 3, None, "scsi-pr")
    fence.attach(lambda: (2, frozenset({1, 2, 3})), None)
    trio.run(fence.fence, 4, 2)
    assert asked == [(4, 2)] and fence.delegated == [(4, 2)]
    with pytest.raises(FenceError, match="no live block server could fence it"):
        trio.run(fence.fence, 1, 2)                      # the only server: nobody left
    served.install(3, {1, 2, 3, 4})                      # node 4 joined again in 3
    with pytest.raises(FenceError, match="node 4 joined again in generation 3"):
        trio.run(fence.fence, 4, 2)                      # a late fence of its old life
    assert asked == [(4, 2)]


def test_a_connection_closed_under_the_proxy_is_made_again_not_taken_for_silence(served):
    """A server that restarted closed the proxy's connection: the proxy connects again
    and goes on with that server (no re-target, nobody suspected)."""
    dev = _proxy(served, 1)
    suspected: list[int] = []
    dev.on_silent = lambda server, waited: suspected.append(server)
    try:
        dev.pwrite(0, b"one" * 100)

        class Closed:
            writes: dict = {}                            # noqa: RUF012

            def request(self, *args, **kwargs):
                raise ConnectionError("connection closed by the server")

            def close(self) -> None:
                pass

        dev._conns[1] = Closed()
        dev.pwrite(0, b"two" * 100)
        assert dev.pread(0, 300) == b"two" * 100
        st = dev.statistics()
        assert suspected == [] and st["retargets"] == 0 and st["silent"] == []
    finally:
        dev.close()


# -- several requests in flight; device I/O off the server's event loop (issue 8) ----
class SlowDevice:
    """A BlockDevice whose reads and writes take `delay` seconds more (a slow disk
    below the real server), counting how many run at once and on which threads."""

    def __init__(self, path: str, delay: float) -> None:
        self.inner = BlockDevice(path)
        self.size = self.inner.size
        self.delay = delay
        self.slow_offsets: dict[int, float] = {}     # offset -> its own delay
        self.lock = threading.Lock()
        self.running = 0
        self.most_at_once = 0
        self.threads: set[str] = set()

    def _slowly(self, offset: int, fn, *args):
        with self.lock:
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
            self.threads.add(threading.current_thread().name)
        try:
            time.sleep(self.slow_offsets.get(offset, self.delay))
            return fn(*args)
        finally:
            with self.lock:
                self.running -= 1

    def pread(self, offset: int, length: int) -> bytes:
        return self._slowly(offset, self.inner.pread, offset, length)

    def pwrite(self, offset: int, data) -> None:
        self._slowly(offset, self.inner.pwrite, offset, data)

    def flush(self) -> None:
        self.inner.flush()

    def close(self) -> None:
        self.inner.close()


@pytest.fixture
def slow(tmp_path) -> Iterator[tuple[Served, SlowDevice]]:
    dev = SlowDevice(_image(tmp_path), 0.05)
    try:
        with _serving(_config([1], io_timeout=1.5), 1, dev) as s:
            yield s, dev
    finally:
        dev.close()


def test_a_proxy_has_several_requests_in_flight_at_the_server(slow):
    """Queued writes (write_behind: file data) and the pieces of a large read are
    sent without waiting for each other's replies: the server's device works on
    several at once, and eight 50 ms writes take about one write's time, not eight.
    (One request at a time: at most one at the device, and 0.4 s.)"""
    served, disk = slow
    dev = _proxy(served, 1)
    try:
        blocks = [os.urandom(64 << 10) for _ in range(8)]
        started = time.monotonic()
        for i, block in enumerate(blocks):
            dev.write_behind(i * MIB, block)
        dev.drain()
        took = time.monotonic() - started
        assert disk.most_at_once >= 4, disk.most_at_once
        assert took < 0.3, took
        dev.flush()
        for i, block in enumerate(blocks):
            assert disk.inner.pread(i * MIB, len(block)) == block
        disk.most_at_once = 0
        whole = dev.pread(0, 4 * MIB)                    # four pieces, side by side
        assert disk.most_at_once >= 2
        assert [whole[i * MIB : i * MIB + len(b)] for i, b in enumerate(blocks[:4])] \
            == blocks[:4]
        assert served.server.statistics()["most_in_flight"] >= 4
    finally:
        dev.close()


def test_a_writer_that_asks_for_room_first_never_waits_on_its_event_loop(slow, monkeypatch):
    """File data is queued from the mount's event loop, which must not wait for a
    server. A writer asks for room first (FileData._check_room) and waits in a worker
    thread when there is none: room means a window slot for every piece the write
    may send and re-send log room for all of it. Before, room meant one free slot:
    a write that sent two pieces read a reply on the loop for the second, and one
    that filled the log flushed there (here: pieces of 256 KiB, a window of 2, a
    1 MiB log, 50 ms writes)."""
    from clusterfs.storage import proxy as proxy_mod
    served, disk = slow
    monkeypatch.setattr(proxy_mod, "PIECE", 256 << 10)
    monkeypatch.setattr(proxy_mod, "WINDOW", 2)
    monkeypatch.setattr(proxy_mod, "LOG_LIMIT", MIB)
    dev = _proxy(served, 1)
    waits_on_loop: list[str] = []

    def recorded(name: str) -> None:
        real = getattr(ProxyDevice, name)

        def call(self, *args):
            with contextlib.suppress(RuntimeError):
                trio.lowlevel.current_trio_token()
                waits_on_loop.append(name)
            return real(self, *args)
        monkeypatch.setattr(ProxyDevice, name, call)

    recorded("_finish")
    recorded("_flush_locked")
    want = {}

    async def writer() -> None:
        for i in range(12):
            data = os.urandom((256 << 10) + 8192)     # two pieces
            while not dev.behind_has_room(len(data)):
                await trio.to_thread.run_sync(dev.wait_behind_room, len(data))
            dev.write_behind(i * MIB // 2, data)
            want[i * MIB // 2] = data
    try:
        trio.run(writer)
        assert waits_on_loop == []
        dev.flush()
        assert dev.statistics()["flushes"] >= 2          # the log filled, off the loop
        for off, data in want.items():
            assert disk.inner.pread(off, len(data)) == data
    finally:
        dev.close()


def test_a_queued_copy_asked_without_waiting_never_waits_for_the_device(served):
    """The mount asks a proxy for a block still queued from its event loop (a write's
    edge block, read ahead by its hold): while a worker thread holds the device (a
    drain or flush waiting out a silent server), the answer is "none" at once and the
    block is read in a worker thread, not a wait on the loop for that thread."""
    dev = _proxy(served, 1)
    try:
        data = os.urandom(8192)
        dev.write_behind(MIB, data)
        assert dev.queued_copy(MIB // 4096 + 1, wait=False) == data[4096:]
        held, release = threading.Event(), threading.Event()

        def hold_the_device() -> None:
            with dev._lock:
                held.set()
                release.wait(5)
        t = threading.Thread(target=hold_the_device)
        t.start()
        try:
            assert held.wait(5)
            started = time.monotonic()
            assert dev.queued_copy(MIB // 4096 + 1, wait=False) is None
            assert time.monotonic() - started < 0.1
        finally:
            release.set()
            t.join(5)
        assert dev.queued_copy(MIB // 4096 + 1, wait=False) == data[4096:]
    finally:
        dev.close()


def test_a_read_never_overtakes_a_queued_write_of_the_same_bytes(slow):
    """The server works on a connection's requests side by side, so the proxy holds
    back a read (or write) of bytes a write in flight covers until that write is
    answered: a slow write followed at once by a read of its bytes reads them."""
    served, disk = slow
    dev = _proxy(served, 1)
    try:
        disk.slow_offsets[2 * MIB] = 0.3                 # this write takes long
        for round_ in range(3):
            data = os.urandom(8192)
            dev.write_behind(2 * MIB, data)
            assert dev.pread(2 * MIB, 8192) == data, round_
            later = os.urandom(4096)
            dev.write_behind(2 * MIB, later)             # a second write of the same
            dev.write_behind(2 * MIB + 4096, data[4096:])
            assert dev.pread(2 * MIB, 8192) == later + data[4096:]
    finally:
        dev.close()


def test_a_slow_request_holds_neither_the_loop_nor_the_connection(slow):
    """Device I/O runs on the server's own I/O threads: while one read waits 1 s on
    the device, the server's event loop keeps ticking and later requests on the
    same connection are answered. (Before: the connection's next request waited for
    the slow one.)"""
    served, disk = slow
    disk.delay = 0.0
    disk.slow_offsets[0] = 1.0
    lags: list[float] = []

    async def watch_the_loop() -> None:              # a heartbeat-like task
        for _ in range(30):
            before = time.monotonic()
            await trio.sleep(0.02)
            lags.append(time.monotonic() - before - 0.02)

    conn = _Connection(served.cfg, 3, 1, 5.0)          # frames by hand: no window
    try:
        def send(rid: int, mtype: int, body: dict) -> None:
            conn._send(wf.encode_prefixed(conn.skey, mtype, 3, 1, conn.out.take(),
                                          {**body, "id": rid}), time.monotonic() + 5)

        send(1, MsgType.BLOCK_READ, {"off": 0, "len": 4096})          # the slow one
        trio.from_thread.run(_spawn, watch_the_loop, trio_token=served.token)
        started = time.monotonic()
        send(2, MsgType.BLOCK_WRITE, {"off": 8192, "data": b"x" * 4096})
        send(3, MsgType.BLOCK_READ, {"off": 8192, "len": 4096})
        answered: dict[int, float] = {}
        while len(answered) < 3:
            f = wf.decode(conn.skey, conn._recv(time.monotonic() + 5), max_frame=bw.MAX_FRAME)
            assert f.body["ok"], f.body
            answered[f.body["id"]] = time.monotonic() - started
        assert answered[2] < 0.5 and answered[3] < 0.5, answered    # not behind #1
        assert answered[1] > 0.8, answered
        assert lags and max(lags) < 0.2, max(lags)
        assert all(name.startswith("block-server-io") for name in disk.threads), \
            disk.threads
    finally:
        conn.close()


async def _spawn(fn) -> None:
    trio.lowlevel.spawn_system_task(fn)



def _hold_loop(served: Served, seconds: float) -> None:
    """Hold `served`'s event loop for `seconds` (a blocking call on it, as a mount's
    synchronous device call would be): the server is slow, not stopped; its stall
    detector's thread keeps ticking."""
    async def hold() -> None:
        time.sleep(seconds)

    trio.from_thread.run(_spawn, hold, trio_token=served.token)


def test_a_slow_servers_late_writes_never_land_over_newer_ones(tmp_path):
    """Item 2 of issue 8: a server whose event loop is held (slow, not stopped: its
    tick thread goes on, so no quarantine) while eight queued writes sit in its
    socket. The proxy times them out, re-targets them to the other server, and then
    writes newer bytes over them there. When the slow server's loop comes back it
    reads the eight old writes: it must execute none of them, because each carries
    the latest moment (on the server's clock) it may start, set by the proxy from
    its send time. (Before: the server measured a request's age from when its loop
    read it, so these looked fresh and landed over the newer bytes.)"""
    from clusterfs.dlm.preferred import server_order
    from clusterfs.storage.proxy import UNMAPPED

    cfg = _config([1, 2], io_timeout=0.5)
    image = _image(tmp_path)
    disks = [BlockDevice(image), BlockDevice(image)]
    try:
        with _serving(cfg, 1, disks[0]) as s1, _serving(cfg, 2, disks[1]) as s2:
            dev = ProxyDevice(cfg, 3)
            dev.attach(lambda: (1, frozenset({1, 2, 3})))
            victim = server_order(UNMAPPED, [1, 2])[0]        # where the proxy writes
            slow = {1: s1, 2: s2}[victim]
            try:
                dev.pwrite(0, b"warm" * 1024)                 # connected to both
                dev.flush()
                _hold_loop(slow, 1.5)
                old = [os.urandom(4096) for _ in range(8)]
                for i, block in enumerate(old):             # every other block: eight
                    dev.write_behind(i * 8192, block)       # requests, not one run
                dev.drain()                                   # re-targeted, no error
                st = dev.statistics()
                assert st["retargets"] >= 1 and victim in st["silent"], st
                newer = os.urandom(16 * 4096)
                dev.pwrite(0, newer)
                dev.flush()
                time.sleep(2.0)               # the slow loop is back, reads the old ones
                assert slow.server.statistics()["stalls"] == 0     # not a stop
                with open(image, "rb") as f:
                    assert f.read(16 * 4096) == newer
                # all eight refused: the one or two its loop had read before it was
                # held by the arrival lease, the others only by their `by`
                st = slow.server.statistics()
                assert st["writes"] == 1 and st["refused"] == 8 and st["late"] >= 6, st
            finally:
                dev.close()
    finally:
        for d in disks:
            d.close()



def test_a_writes_start_deadline_is_never_later_than_the_proxy_allows(monkeypatch):
    """The proxy maps a write's start deadline onto the server's clock through a
    lower bound of the two clocks' offset, learnt from the times the server's frames
    carry: a frame that was late (it sat somewhere) only makes the bound lower, never
    higher than the true offset; the deadline is then at most the true one."""
    from clusterfs.storage import proxy

    now = [100.0]
    monkeypatch.setattr(proxy.time, "monotonic", lambda: now[0])
    true_offset = 5000.0                                 # server clock - ours
    conn = object.__new__(_Connection)
    conn.offset, conn.offset_at = float("-inf"), 0.0
    assert conn.server_time(now[0]) is None              # a server that said nothing
    for sent, delay in ((99.9, 0.1), (100.5, 0.4), (101.0, 0.0), (102.0, 1.5)):
        now[0] = sent + delay                             # its frame reaches us now
        conn._clock({"t": sent + true_offset})
        assert conn.server_time(now[0]) <= now[0] + true_offset
    now[0] = 103.5
    assert conn.server_time(103.6) == pytest.approx(103.6 + true_offset, abs=1e-3)
    now[0] = 3700.0                                      # an hour without a frame
    assert 103.6 + true_offset - conn.server_time(103.6) == pytest.approx(0.36, abs=1e-3)


# -- seed 000 with a window: a stopped server, several writes in flight to it --------
BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                     "tools", "iscsibench.py")


@contextlib.contextmanager
def _server_processes(image: str, cfg, ports: list[int], nodes: tuple[int, ...],
                      env: dict[int, dict[str, str]] | None = None) -> Iterator[dict]:
    """Block servers of `nodes` on `image`, each a process of its own (so that it
    can be SIGSTOPped); killed by pid at the end. `env`: more environment for some
    (tools/iscsibench.py's test hook)."""
    procs: dict[int, subprocess.Popen] = {}
    try:
        for n in nodes:
            procs[n] = subprocess.Popen(
                [sys.executable, BENCH, "--serve", image, str(n), ",".join(map(str, ports)),
                 str(cfg.io_timeout), cfg.key.hex()], stdout=subprocess.PIPE, text=True,
                env={**os.environ, **(env or {}).get(n, {})})
            assert procs[n].stdout.readline().strip() == "serving"
        yield procs
    finally:
        for p in procs.values():
            if p.poll() is None:
                os.kill(p.pid, signal.SIGCONT)
                os.kill(p.pid, signal.SIGKILL)
            p.wait()


def test_writes_in_flight_to_a_stopped_server_are_retargeted_and_never_land_stale(tmp_path):
    """Seed 000 with several requests in flight: the proxy's preferred server is
    SIGSTOPped and eight queued writes go to it; they time out, the proxy re-targets
    them to the other server (no error), reads them back there, and overwrites them.
    The eight are maybe in flight on the stopped server (it took them and did not
    answer), so the drain returns only once it is out of the view, which membership
    does about 1.2 s after a stop (here a timer, 1 s after it). On SIGCONT the
    stopped server finds those eight writes in its socket: it must write none of
    them (it was stopped: quarantine), so the newer bytes stay. Its writes count as
    settled only once its fence is done (here the timer's stand-in for
    membership's Fenced, 0.3 s after the removal)."""
    from clusterfs.dlm.preferred import server_order
    from clusterfs.storage.proxy import UNMAPPED

    ports = free_ports(5)
    cfg = _bench_config(ports, io_timeout=0.5)
    image = _image(tmp_path)
    view = [(1, frozenset({1, 2, 3}))]
    with _server_processes(image, cfg, ports, (1, 2)) as procs:
        dev = ProxyDevice(cfg, 3)
        dev.attach(lambda: view[0])
        removed = None
        try:
            victim = server_order(UNMAPPED, [1, 2])[0]      # where the proxy writes
            dev.pwrite(0, b"warm" * 1024)
            dev.flush()
            os.kill(procs[victim].pid, signal.SIGSTOP)
            stopped = time.monotonic()
            removed = threading.Timer(1.0, view.__setitem__,
                                      (0, (2, frozenset({1, 2, 3}) - {victim})))
            fenced = threading.Timer(1.3, dev.server_fenced, ([victim], 2))
            removed.start()
            fenced.start()
            stale = [os.urandom(4096) for _ in range(8)]
            for i, block in enumerate(stale):             # every other block: eight
                dev.write_behind(i * 8192, block)         # requests, not one run
            dev.drain()                                   # no error: re-targeted
            assert time.monotonic() - stopped >= 1.3      # and the victim was fenced
            st = dev.statistics()
            assert st["retargets"] >= 1 and victim in st["silent"], st
            assert st["maybe_in_flight"] >= 1 and st["unsettled"] == 0, st
            assert [dev.pread(i * 8192, 4096) for i in range(8)] == stale
            newer = os.urandom(16 * 4096)
            dev.pwrite(0, newer)
            dev.flush()
            os.kill(procs[victim].pid, signal.SIGCONT)
            time.sleep(1.0)                               # it reads what was sent
            with open(image, "rb") as f:
                assert f.read(16 * 4096) == newer
        finally:
            if removed is not None:
                removed.cancel()
                fenced.cancel()
            dev.close()


# -- a write maybe in flight: newer writes of its bytes wait for it (issue 8) --------
def test_a_server_closes_a_half_closed_connection_only_once_its_io_is_done(slow):
    """What the proxy counts on for a write whose reply did not come: it half-closes
    the connection (no more requests), and the server closes its end only once
    every request it read from it is done, so the close says the write can no longer
    land. The write's device I/O takes 1 s here: the close comes after it, with the
    bytes on the disk."""
    served, disk = slow
    disk.slow_offsets[0] = 1.0
    conn = _Connection(served.cfg, 3, 1, 5.0)
    try:
        data = os.urandom(4096)
        started = time.monotonic()
        conn.send(MsgType.BLOCK_WRITE, 1, {"id": 1, "off": 0, "data": data},
                  time.monotonic() + 5, 5.0, seq=1)
        time.sleep(0.2)                                  # under way on the server
        conn.linger()
        while not conn.settled():
            assert time.monotonic() - started < 5
            time.sleep(0.01)
        assert time.monotonic() - started >= 0.9
        assert disk.inner.pread(0, 4096) == data
    finally:
        conn.close()


def test_only_newer_overlapping_writes_wait_for_one_maybe_in_flight():
    """The rule by itself: a write maybe in flight (number 5, one block) holds back
    writes that overlap it and are newer; not older ones or itself (the log re-sent
    after a silence: it ends with the newest copy), nor writes elsewhere. A held
    write holds back the newer ones over its own bytes, and reads see it."""
    from clusterfs.storage.proxy import _Logged

    dev = object.__new__(ProxyDevice)
    dev.stats = {"held": 0}
    dev._held = []
    dev._lingering = [types.SimpleNamespace(writes={7: (8192, 4096, 5)})]
    older, itself = _Logged(8192, b"a" * 4096, 3), _Logged(8192, b"b" * 4096, 5)
    newer, elsewhere = _Logged(4096, b"c" * 8192, 6), _Logged(0, b"d" * 4096, 9)
    assert not dev._must_wait(older) and not dev._must_wait(itself)
    assert dev._must_wait(newer) and not dev._must_wait(elsewhere)
    dev._hold(newer)
    later = _Logged(4096, b"e" * 4096, 10)               # over the held one only
    assert dev._must_wait(later)
    dev._lingering = []                                   # settled
    assert not dev._must_wait(newer) and dev._must_wait(later)
    assert dev._with_held(0, bytes(16384)) == bytes(4096) + b"c" * 8192 + bytes(4096)


def test_a_write_held_twice_is_held_once_and_sent_once_settled(served):
    """A put that finds its server silent re-sends the log, and that re-send may hold
    the very write being put before the put finds it blocked and holds it again.
    Held twice, the settle sent one copy and left the other in the held list marked
    not held: it blocked every newer write of its bytes and the flush for good (a
    proxied mount withdrew after a SIGSTOP of its server now and then, once no read
    came between its writes: tests/test_proxy.py)."""
    dev = _proxy(served, 1)
    try:
        entry = dev._logged(0, b"w" * 4096)
        dev._hold(entry)
        dev._hold(entry)                          # the nested re-send's, then the put's
        assert dev._held == [entry] and entry.held
        dev._settle()                             # nothing in flight blocks it: sent
        assert dev._held == [] and not entry.held
        dev.flush()                               # nothing left to wait for
        assert dev.pread(0, 4096) == b"w" * 4096
    finally:
        dev.close()


@contextlib.contextmanager
def _slow_pair(tmp_path, block: int, seconds: float) -> Iterator[tuple]:
    """Servers 1 and 2 on one image, in this process; the device of the one the
    proxy writes to first takes `seconds` on every write at `block`. Yields (proxy,
    image path, that server)."""
    from clusterfs.dlm.preferred import server_order
    from clusterfs.storage.proxy import UNMAPPED

    cfg = _config([1, 2], io_timeout=0.5)
    image = _image(tmp_path)
    victim = server_order(UNMAPPED, [1, 2])[0]
    disks = {n: SlowDevice(image, 0.0) for n in (1, 2)}
    disks[victim].slow_offsets[block] = seconds
    try:
        with _serving(cfg, 1, disks[1]), _serving(cfg, 2, disks[2]):
            dev = ProxyDevice(cfg, 3)
            dev.attach(lambda: (1, frozenset({1, 2, 3})))
            try:
                dev.pwrite(0, b"warm" * 1024)             # connected to both
                dev.flush()
                yield dev, image, victim
            finally:
                dev.close()
                time.sleep(max(0.0, seconds - 0.5))       # its slow write ends
    finally:
        for d in disks.values():
            d.close()


def _on_disk(image: str, offset: int) -> bytes:
    with open(image, "rb") as f:
        f.seek(offset)
        return f.read(4096)


def test_a_newer_write_is_held_until_the_old_one_is_settled_and_read_meanwhile(tmp_path):
    """The old write outlasts the proxy's wait (its server's device takes 1.5 s) and
    is re-sent through the other server. The newer copy of the block is held, not
    sent: reads through the proxy return it, the disk still holds the old copy; a
    drain returns once the slow server closed the connection (its write done), with
    the newer copy sent and on the disk."""
    block = 64 * 4096
    with _slow_pair(tmp_path, block, 1.5) as (dev, image, victim):
        old, newer = os.urandom(4096), os.urandom(4096)
        dev.pwrite(block, old)                           # re-targeted after 0.5 s
        assert victim in dev.statistics()["silent"]
        dev.pwrite(block, newer)
        st = dev.statistics()
        assert st["holding"] == 1 and st["unsettled"] == 1, st
        assert dev.pread(block, 4096) == newer
        assert dev.pread(block - 4096, 3 * 4096)[4096:8192] == newer
        assert _on_disk(image, block) == old
        assert dev.behind_pending >= 8192                # a drain has work to do
        dev.drain()
        st = dev.statistics()
        assert st["holding"] == 0 and st["unsettled"] == 0, st
        assert _on_disk(image, block) == newer
        assert dev.pread(block, 4096) == newer


def test_a_server_that_never_settles_fails_the_flush_instead_of_hanging(tmp_path):
    """A server that took a write, is alive (not removed from the view) and never
    finishes it: the held newer copy cannot be ordered after it, so a flush fails
    (StorageError: the mount withdraws) after settle_timeout instead of hanging or
    writing the newer copy where the old one could land over it."""
    block = 64 * 4096
    with _slow_pair(tmp_path, block, 3.0) as (dev, _path, _victim):
        dev.settle_timeout = 0.8
        dev.pwrite(block, b"o" * 4096)                   # re-targeted after 0.5 s
        dev.pwrite(block, b"n" * 4096)                   # held
        started = time.monotonic()
        with pytest.raises(StorageError, match="neither answered them"):
            dev.flush()
        assert time.monotonic() - started < 1.5
        assert dev.pread(block, 4096) == b"n" * 4096


def _said(proc: subprocess.Popen, line: str, timeout: float) -> bool:
    """Whether `proc` writes `line` on its stdout within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], deadline - time.monotonic())
        if ready:
            got = proc.stdout.readline()
            if not got:
                return False
            if got.strip() == line:
                return True
    return False


def test_a_write_that_outlasts_the_proxys_wait_never_lands_over_a_newer_one(tmp_path):
    """Issue 8's last hole: the preferred server checks a write's `by` (in time) and
    starts it, and its device then takes 1.2 s on it (tools/iscsibench.py's test
    hook; slow, not hung: under the 1.5 s disk_timeout), while the proxy waits
    0.5 s. The proxy re-targets the write to the other server, then writes a newer
    copy of the same block. The slow server is alive (it answers and is never
    fenced), so nothing stops its device write: the newer copy may go nowhere until
    that server has said it is done with the old one. Once the slow write landed,
    the block must hold the newer copy, and reads through the proxy never see the
    old one after the newer was written. (Before: the newer copy went to the other
    server at once, and the old one landed over it 0.7 s later.)"""
    from clusterfs.dlm.preferred import server_order
    from clusterfs.storage.proxy import UNMAPPED

    ports = free_ports(5)
    cfg = _bench_config(ports, io_timeout=0.5)
    image = _image(tmp_path)
    victim = server_order(UNMAPPED, [1, 2])[0]            # where the proxy writes
    block = 64 * 4096
    slow = {victim: {"CLUSTERFS_TEST_SLOW_WRITE": f"{block}:1.2"}}
    with _server_processes(image, cfg, ports, (1, 2), slow) as procs:
        dev = ProxyDevice(cfg, 3)
        dev.attach(lambda: (1, frozenset({1, 2, 3})))
        try:
            dev.pwrite(0, b"warm" * 1024)                 # connected to both
            dev.flush()
            old, newer = os.urandom(4096), os.urandom(4096)
            dev.pwrite(block, old)                        # outlasts the wait: re-targeted
            st = dev.statistics()
            assert st["retargets"] >= 1 and victim in st["silent"], st
            dev.pwrite(block, newer)
            assert dev.pread(block, 4096) == newer
            dev.flush()
            assert dev.pread(block, 4096) == newer
            assert _said(procs[victim], "slow write landed", 5.0)
            time.sleep(0.2)
            with open(image, "rb") as f:
                f.seek(block)
                on_disk = f.read(4096)
            assert on_disk != old, "the old write landed over the newer copy"
            assert on_disk == newer
            assert dev.pread(block, 4096) == newer
        finally:
            dev.close()


def _bench_config(p: list[int], io_timeout: float):
    """tools/iscsibench.py's config (its --serve mode builds the same from the same
    ports): nodes 1 and 2 serve, 3 proxies."""
    return parse_config({
        "name": "bench", "key": os.urandom(32).hex(),
        "timeouts": {"failure_timeout": max(3.0, 2 * io_timeout)},
        "node": [{"id": i, "address": f"127.0.0.1:{p[i - 1]}"} for i in (1, 2, 3)],
        "storage": {"group": [1, 2], "io_timeout": io_timeout,
                    "servers": {"1": f"127.0.0.1:{p[3]}", "2": f"127.0.0.1:{p[4]}"}}})


# -- a write maybe in flight on a removed server waits for its fence (issue 8) ------
def _flush_in_thread(dev: ProxyDevice) -> tuple[threading.Thread, list]:
    """dev.flush() on a thread of its own; the list gets its exception, if any."""
    failed: list = []

    def run() -> None:
        try:
            dev.flush()
        except StorageError as exc:
            failed.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, failed


def _stalling_pair(tmp_path, seconds: float):
    """Servers 1 and 2 as processes on one image, the first the proxy writes to
    stalling `seconds` on its first write at block 64: (cfg, ports, image, victim,
    block, env)."""
    from clusterfs.dlm.preferred import server_order
    from clusterfs.storage.proxy import UNMAPPED

    ports = free_ports(5)
    cfg = _bench_config(ports, io_timeout=0.5)
    victim = server_order(UNMAPPED, [1, 2])[0]            # where the proxy writes
    block = 64 * 4096
    env = {victim: {"CLUSTERFS_TEST_SLOW_WRITE": f"{block}:{seconds:g}"}}
    return cfg, ports, _image(tmp_path), victim, block, env


@contextlib.contextmanager
def _proxy_on_stalling_pair(tmp_path, seconds: float, view) -> Iterator[tuple]:
    """_stalling_pair's servers as processes and a proxy (node 3, its view from
    `view()`) that has written and flushed once, so it is connected to both:
    (dev, procs, image, victim, block). The proxy is closed after."""
    cfg, ports, image, victim, block, env = _stalling_pair(tmp_path, seconds)
    with _server_processes(image, cfg, ports, (1, 2), env) as procs:
        dev = ProxyDevice(cfg, 3)
        dev.attach(view)
        try:
            dev.pwrite(0, b"warm" * 1024)                 # connected to both
            dev.flush()
            yield dev, procs, image, victim, block
        finally:
            dev.close()


def test_a_removed_servers_write_maybe_in_flight_waits_for_its_fence(tmp_path):
    """The double fault: the proxy's server stalls on one device write (30 s: its
    disk is stuck) and is then stopped (SIGSTOP, before its disk watch could stop
    it) and removed from the proxy's view, its fence not done yet (slow: a process
    agent waiting for a process stuck in the kernel, a PREEMPT under way). Leaving
    the view is not enough: the stalled write can still land once it runs again.
    So the newer copy of the block stays held and a flush waits, through a Fenced
    of an older view (a fence of an earlier life, before the write went out),
    until the fence of the view that removed it is done; then the newer copy goes
    out and the flush returns. (Before: the newer copy went out and the flush
    returned as soon as the server was out of the view.)"""
    view = [(1, frozenset({1, 2, 3}))]
    with _proxy_on_stalling_pair(tmp_path, 30, lambda: view[0]) as (
            dev, procs, image, victim, block):
        old, newer = os.urandom(4096), os.urandom(4096)
        dev.pwrite(block, old)                        # stalls: re-targeted
        os.kill(procs[victim].pid, signal.SIGSTOP)    # and its node is stopped
        dev.pwrite(block, newer)                      # held behind it
        view[0] = (2, frozenset({1, 2, 3}) - {victim})    # removed, not fenced
        assert dev.pread(block, 4096) == newer
        flushing, failed = _flush_in_thread(dev)
        flushing.join(0.6)
        dev.server_fenced([victim], 1)                # an older life's fence
        flushing.join(0.6)
        assert flushing.is_alive() and not failed, "the flush went on unfenced"
        st = dev.statistics()
        assert st["holding"] == 1 and st["unsettled"] == 1, st
        assert _on_disk(image, block) == old          # the newer copy not sent
        dev.server_fenced([victim], 2)                # the fence is done
        flushing.join(5)
        assert not flushing.is_alive() and not failed, failed
        assert _on_disk(image, block) == newer
        st = dev.statistics()
        assert st["holding"] == 0 and st["unsettled"] == 0, st


def test_a_fence_that_never_completes_fails_the_flush_not_the_data(tmp_path):
    """The same stopped and removed server, its fence failing for good: the flush
    fails after settle_timeout (the mount withdraws) and the newer copy was never
    sent where the stalled write could still land over it."""
    view = [(1, frozenset({1, 2, 3}))]
    with _proxy_on_stalling_pair(tmp_path, 30, lambda: view[0]) as (
            dev, procs, image, victim, block):
        dev.settle_timeout = 1.5
        dev.pwrite(block, b"o" * 4096)
        os.kill(procs[victim].pid, signal.SIGSTOP)
        dev.pwrite(block, b"n" * 4096)
        view[0] = (2, frozenset({1, 2, 3}) - {victim})
        with pytest.raises(StorageError, match="nor were fenced"):
            dev.flush()
        assert _on_disk(image, block) == b"o" * 4096


# -- a server whose disk hangs stops serving and fences itself (issue 8) -------------
def test_a_server_whose_disk_hangs_stops_and_the_proxy_goes_on_with_nothing_lost(tmp_path):
    """The proxy's server is alive but its disk hangs on one write (60 s), with
    writes of other blocks around it. The proxy re-targets the stalled write after
    io_timeout (0.5 s) and holds the newer copy of that block. The hung server's
    disk watch finds a device write under way for longer than disk_timeout (half
    the 3 s failure timeout): it stops serving, says why in one line, and fences
    itself (the process goes; a mount's would be removed and fenced by the
    survivors). Its connection closes, the held write settles, and the proxy's
    flush returns with no error: every byte on the disk is the newest. (Before:
    nothing stopped the server, and the flush failed after twice the failure
    timeout, so the mount withdrew.)"""
    with _proxy_on_stalling_pair(tmp_path, 60, lambda: (1, frozenset({1, 2, 3}))) as (
            dev, procs, image, victim, block):
        want = {at: os.urandom(4096) for at in range(0, 128 * 4096, 4096)}
        for at, data in want.items():                 # the write at `block` hangs
            dev.pwrite(at, data)
        want[block] = os.urandom(4096)
        dev.pwrite(block, want[block])                # held behind the hung one
        dev.flush()                                   # no error
        said = procs[victim].stdout.readline()
        assert said.startswith("disk hung: block server stops serving"), said
        assert "disk_timeout 1.5 s" in said, said
        assert procs[victim].wait(5) == -signal.SIGKILL
        assert dev.statistics()["unsettled"] == 0
        with open(image, "rb") as f:
            disk = f.read(128 * 4096)
        for at, data in want.items():
            assert disk[at : at + 4096] == data, f"block at {at} lost"
        assert dev.pread(0, 128 * 4096) == disk


def test_disk_timeout_defaults_to_half_the_failure_timeout_and_is_checked():
    """[storage] disk_timeout: at least io_timeout (a slow disk is re-targeted from,
    not fenced), below failure_timeout (the proxies' flushes wait twice that)."""
    from clusterfs.errors import ConfigError

    assert _config([1, 2], io_timeout=0.5).disk_hung_after == 1.5
    base = {"name": "t", "key": os.urandom(32).hex(),
            "node": [{"id": i, "address": f"127.0.0.1:{7000 + i}"} for i in (1, 2, 3)]}
    ok = parse_config({**base, "storage": {"group": [1, 2], "disk_timeout": 2}})
    assert ok.disk_hung_after == 2.0
    for bad in (0.1, 3, "x"):
        with pytest.raises(ConfigError, match=r"storage\.disk_timeout"):
            parse_config({**base, "storage": {"group": [1, 2], "io_timeout": 0.5,
                                              "disk_timeout": bad}})


def test_the_disk_watch_stops_serving_only_with_another_server_live(tmp_path):
    """The watch itself: a device call under way for longer than disk_timeout of
    running time stops the server (every request refused, on_disk_hung told once),
    unless no other server of the group is in its view; a stall of the whole
    process does not count as the device's time."""
    cfg = _config([1, 2], io_timeout=0.2)
    server = BlockServer(cfg, 1, None, Views())
    told: list[str] = []
    server.on_disk_hung = told.append
    server._io_threads = types.SimpleNamespace(oldest=lambda: 100.0)
    server.members = frozenset({1, 3})                 # the only server live
    server._watch_disk(100.0 + 5)
    assert server.disk_hung is None and not told
    server.members = frozenset({1, 2, 3})
    server.resumed_at = 104.0                          # stopped until then
    server._watch_disk(105.0)
    assert server.disk_hung is None
    server._watch_disk(104.0 + cfg.disk_hung_after + 0.1)
    assert server.disk_hung is not None and told == [server.disk_hung]
    assert "servers [2] serve on" in told[0]
    server._watch_disk(200.0)
    assert len(told) == 1


def test_the_mount_hands_the_proxy_every_fence_done():
    """node/storagegroup.py: membership's Fenced events reach the proxy device
    (server_fenced), views do not."""
    from clusterfs.membership.view import Fenced
    from clusterfs.node.storagegroup import follow_fences

    got: list = []
    dev = types.SimpleNamespace(server_fenced=lambda nodes, gen: got.append((nodes, gen)))
    views = Views()

    async def main() -> None:
        follow = follow_fences(dev, views)
        views.send.send_nowait(Fenced(2, frozenset({1})))
        views.send.send_nowait(Fenced(4, frozenset({2, 1})))
        views.send.close()
        await follow()

    trio.run(main)
    assert got == [(frozenset({1}), 2), (frozenset({1, 2}), 4)]


# -- writes that end inside a block: the queued run (issue 8) -------------------------
BLOCK = 4096


def _edge_block(dev: ProxyDevice, blkno: int, at: int, data: bytes) -> memoryview:
    """Block `blkno` as a write of `data` at byte `at` leaves it: its newest bytes
    (read_newest, as the file system reads them) with the write's laid over."""
    block = bytearray(dev.read_newest(blkno))
    lo, hi = max(at, blkno * BLOCK), min(at + len(data), (blkno + 1) * BLOCK)
    block[lo - blkno * BLOCK : hi - blkno * BLOCK] = data[lo - at : hi - at]
    return memoryview(block)


def _queue_request(dev: ProxyDevice, at: int, data: bytes) -> None:
    """What the file system queues for one write request (FileData._assemble): a
    block it starts or ends inside made whole from that block's newest bytes, the
    blocks it fills whole as one view of the request, in order."""
    end = at + len(data)
    first, last = at // BLOCK, (end - 1) // BLOCK
    edges = {blk: _edge_block(dev, blk, at, data)
             for blk in {first if at % BLOCK else None, last if end % BLOCK else None}
             if blk is not None}
    inner_from = at if not at % BLOCK else (first + 1) * BLOCK
    inner_to = end if not end % BLOCK else last * BLOCK
    if first in edges:
        dev.write_behind(first * BLOCK, edges[first])
    if inner_to > inner_from:
        dev.write_behind(inner_from, memoryview(data)[inner_from - at : inner_to - at])
    if last in edges and last != first:
        dev.write_behind(last * BLOCK, edges[last])


def _kernel_split_write(dev: ProxyDevice, at: int, data: bytes, skew: int) -> None:
    """One write() from a buffer `skew` bytes past a page edge, on a direct_io file:
    the kernel sends it as requests of at most 256 pages of the buffer, so the first
    is 1 MiB - skew bytes and the others start at a page edge of the buffer."""
    step = MIB - skew
    while data:
        _queue_request(dev, at, data[:step])
        at, data, step = at + len(data[:step]), data[step:], MIB


def test_a_kernel_split_stream_sends_each_megabyte_once_in_one_request(served):
    """A 1 MiB write() from a malloc'd buffer (16 bytes past a page edge) reaches the
    file system as 1 MiB - 16 bytes, then 16: the first queues its 255 whole blocks
    and the block it ends inside, the second that block again, whole. The queued
    run takes the second copy of the block in place of the first: the server gets
    one 1 MiB write per megabyte, as from an aligned buffer. (Before: three writes,
    the block twice, and its second copy waited for the first one's reply.)"""
    dev = _proxy(served, 1)
    try:
        expected = bytearray(dev.size)
        for i in range(6):
            data = os.urandom(MIB)
            _kernel_split_write(dev, i * MIB, data, skew=16)
            expected[i * MIB : (i + 1) * MIB] = data
        assert dev.behind_pending > 0             # queued: a drain has to wait for it
        dev.drain()
        assert dev.behind_pending == 0
        st = served.server.statistics()
        assert st["writes"] == 6, st
        assert dev.stats["superseded"] == 6 * BLOCK
        assert dev.pread(0, dev.size) == expected
    finally:
        dev.close()


def test_unaligned_writes_read_back_exactly_also_across_a_retarget(tmp_path):
    """Writes of random lengths at random offsets from buffers a random number of
    bytes past a page edge, queued as the file system queues them, with reads of
    the bytes just written and of others in between; half-way the server the proxy
    writes to has its loop held for 1.5 s (slow, not stopped), so what it was sent
    times out and goes to the other server. Every read, the proxy's and the disk's
    once the held server has read its stale requests, is the newest copy."""
    import random

    from clusterfs.dlm.preferred import server_order
    from clusterfs.storage.proxy import UNMAPPED

    rng = random.Random(8)
    area = 4 * MIB
    cfg = _config([1, 2], io_timeout=0.5)
    image = _image(tmp_path)
    disks = [BlockDevice(image), BlockDevice(image)]
    try:
        with _serving(cfg, 1, disks[0]) as s1, _serving(cfg, 2, disks[1]) as s2:
            victim = {1: s1, 2: s2}[server_order(UNMAPPED, [1, 2])[0]]
            dev = ProxyDevice(cfg, 3)
            dev.attach(lambda: (1, frozenset({1, 2, 3})))
            model = bytearray(area)
            try:
                for n in range(80):
                    if n == 40:
                        _hold_loop(victim, 1.5)
                    at = rng.randrange(area - 1)
                    size = rng.choice([16, 3000, BLOCK, 70000, MIB, 2 * MIB])
                    data = rng.randbytes(min(size + rng.randrange(64), area - at))
                    _kernel_split_write(dev, at, data, skew=rng.randrange(BLOCK))
                    model[at : at + len(data)] = data
                    if n % 4 == 3:
                        assert dev.pread(at, len(data)) == model[at : at + len(data)], n
                        lo = rng.randrange(area - 3 * BLOCK)
                        assert dev.pread(lo, 3 * BLOCK) == model[lo : lo + 3 * BLOCK], n
                    if n % 16 == 15:
                        dev.flush()
                dev.flush()
                assert dev.statistics()["retargets"] >= 1
                assert dev.pread(0, area) == model
                time.sleep(2.0)               # the held loop is back, reads what it had
                with open(image, "rb") as f:
                    assert f.read(area) == model
            finally:
                dev.close()
    finally:
        for d in disks:
            d.close()


def test_queued_writes_refused_before_they_go_are_dropped_not_sent(served):
    """A queued write goes out later than write_behind returned: refuse_writes (a
    poison pill, a withdraw) meanwhile drops it, and the call that would have sent
    it says so; a write guard that refuses by then keeps it from going too."""
    dev = _proxy(served, 1)
    try:
        dev.write_behind(0, b"q" * BLOCK)
        dev.refuse_writes("poison pill: stop")
        with pytest.raises(StorageError, match="poison pill"):
            dev.drain()
        assert dev.behind_pending == 0
        assert dev.pread(0, BLOCK) == bytes(BLOCK)          # reads go on
        assert served.server.statistics()["writes"] == 0
    finally:
        dev.close()
    dev = _proxy(served, 1)
    fired: list[str] = []

    def guard() -> None:
        if fired:
            raise StorageError(f"write refused: {fired[0]}")

    try:
        dev.guard_writes(guard)
        dev.write_behind(0, b"g" * BLOCK)
        fired.append("pill seen")
        with pytest.raises(StorageError, match="pill seen"):
            dev.drain()
        assert served.server.statistics()["writes"] == 0
    finally:
        dev.guard_writes(None)
        dev.close()


def test_a_flush_that_lets_go_of_the_lock_never_reorders_queued_bytes(served, monkeypatch):
    """Sending the queued run may first flush the re-send log (it would pass
    LOG_LIMIT), and a flush lets go of the device lock while it waits for writes
    maybe in flight: another thread's write can come then (a truncate's pwrite on
    the event loop while a worker drains). The run is sent only after that flush,
    nothing taken off it before, so a newer write of its bytes still goes after
    them. (Taken off first, the queued block was logged and sent after the newer
    write, and landed over it.)"""
    from clusterfs.storage import proxy

    dev = _proxy(served, 1)
    try:
        old, newer = b"o" * BLOCK, b"n" * BLOCK
        dev.pwrite(8 * BLOCK, b"x" * BLOCK)                # the log holds a block
        dev.write_behind(0, old)                           # queued
        monkeypatch.setattr(proxy, "LOG_LIMIT", BLOCK)     # sending it needs a flush
        flush = dev._flush_locked
        meanwhile: list[bytes] = []

        def flush_letting_go() -> None:
            flush()
            if not meanwhile:                              # what came while it waited
                meanwhile.append(newer)
                dev.pwrite(0, newer)

        monkeypatch.setattr(dev, "_flush_locked", flush_letting_go)
        dev.drain()
        dev.flush()
        assert meanwhile and dev.pread(0, BLOCK) == newer
    finally:
        dev.close()


# -- read-ahead through the proxy -----------------------------------------------------------

def _read_sequentially(dev: ProxyDevice, offset: int, length: int,
                       step: int = 256 << 10) -> tuple[bytes, list[bool]]:
    """As the mount reads a file: advise, then for each FUSE-sized read data_ready and
    read_data (or a plain read where no piece holds it). The bytes, and which reads
    a piece read ahead answered."""
    async def run() -> tuple[bytes, list[bool]]:
        dev.advise_willneed(offset // 4096, length // 4096)
        got, ahead = [], []
        for at in range(offset, offset + length, step):
            ready = await dev.data_ready(at, step)
            ahead.append(ready)
            got.append(dev.read_data(at, step) if ready else await dev.read_async(at, step))
        return b"".join(got), ahead
    return trio.run(run)


def _written_through(dev: ProxyDevice, size: int) -> bytes:
    """`size` random bytes written from offset 0 through `dev` and flushed."""
    data = os.urandom(size)
    dev.pwrite(0, data)
    dev.flush()
    return data


def test_a_sequential_readers_next_pieces_are_read_ahead_side_by_side(slow):
    """advise_willneed sends a reader's next pieces (1 MiB each) without waiting, up
    to AHEAD_PIECES at once: the slow device below the server has several reads at
    once (one at a time before: every read a synchronous round trip), data_ready
    waits for a piece with the event loop free, and read_data answers from it."""
    served, disk = slow
    dev = _proxy(served, 1)
    try:
        data = _written_through(dev, 4 * MIB)
        disk.most_at_once = 0
        got, ahead = _read_sequentially(dev, 0, 4 * MIB)
        assert got == data
        assert all(ahead), ahead
        stats = dev.statistics()
        assert stats["read_ahead"] == 4 and stats["read_ahead_used"] == 16, stats
        assert disk.most_at_once >= 3, disk.most_at_once
    finally:
        dev.close()


def test_a_write_makes_what_was_read_ahead_of_its_bytes_stale(served):
    """A piece read ahead and then written over (a queued write, or a synchronous
    one) is never used: the read sees the new bytes. forget_read_ahead (a data lock
    going to another node) drops every piece."""
    dev = _proxy(served, 1)
    try:
        old = _written_through(dev, 2 * MIB)

        async def run() -> None:
            dev.advise_willneed(0, 2 * MIB // 4096)
            assert await dev.data_ready(0, 4096) and await dev.data_ready(MIB, 4096)
            new = os.urandom(8192)
            dev.write_behind(4096, new)                  # inside the first piece
            assert not await dev.data_ready(4096, 8192)
            assert dev.read_data(0, 3 * 4096) == old[:4096] + new
            dev.pwrite(MIB + 4096, new)                  # inside the second
            assert not await dev.data_ready(MIB, 4096)
            assert dev.read_data(MIB, 3 * 4096) == old[MIB : MIB + 4096] + new
            dev.advise_willneed(0, 2 * MIB // 4096)
            dev.drain()
            dev.advise_willneed(0, 2 * MIB // 4096)
            assert await dev.data_ready(0, 4096)
            dev.forget_read_ahead()
            assert not await dev.data_ready(0, 4096)
        trio.run(run)
    finally:
        dev.close()


def test_read_ahead_never_overtakes_a_write_not_yet_answered(slow):
    """The server works on a connection's requests side by side, so a piece over the
    bytes of a write still in flight (a slow one here) is not read ahead: the reader
    reads it plainly, after the write, and sees the write's bytes."""
    served, disk = slow
    dev = _proxy(served, 1)
    try:
        _written_through(dev, 3 * MIB)                   # the old bytes
        disk.slow_offsets[MIB] = 0.4                     # this write takes long
        new = os.urandom(MIB)
        dev.write_behind(MIB, new)
        dev.write_behind(2 * MIB, b"\0" * 4096)          # the run goes: MIB is in flight
        got, ahead = _read_sequentially(dev, 0, 3 * MIB)
        assert got[MIB : 2 * MIB] == new
        assert ahead[:4] == [True] * 4 and not any(ahead[4:8]), ahead
    finally:
        dev.close()
