"""Proxy I/O with real mounts (issue 8, items 2 and 3).

Nodes 1 and 2 reach the loop device directly and serve it (the storage group);
node 3 has no path of its own (the config leaves it out of the group) and mounts
through them. Every node is its own `clusterfs mount` process; tests drive the
mounts from separate processes (this one and small writers).
"""

from __future__ import annotations

import mmap
import os
import signal
import subprocess
import sys
import time

import mountutil
import pytest
from clusterutil import Cluster
from proxyutil import BLOB, IO_TIMEOUT, MIB, ProxyCluster, blob, status, wait_fenced, wait_view

from clusterfs.dlm.preferred import server_order


@pytest.fixture(autouse=True)
def _prereq():
    mountutil.require_mounts()


def test_two_servers_and_a_proxy_stay_coherent(tmp_path):
    with ProxyCluster(tmp_path) as c:
        st = status(c, 3)
        assert st["device"]["requests"] > 0 and set(st["device"]["per_server"]) == {"1", "2"}
        assert status(c, 1)["block_server"]["reads"] > 0
        big = blob("from3", 3 * MIB + 123)
        with open(c.path(3, "from3"), "wb") as f:          # written through the proxy
            f.write(big)
            f.flush()
            os.fsync(f.fileno())
        for n in (1, 2):
            with open(c.path(n, "from3"), "rb") as f:
                assert f.read() == big, n
        with open(c.path(1, "from1"), "wb") as f:          # read through the proxy
            f.write(b"one" * 5000)
        with open(c.path(3, "from1"), "rb") as f:
            assert f.read() == b"one" * 5000
        _kernel_split_writes(c)
        os.mkdir(c.path(2, "d"))
        os.rename(c.path(3, "from1"), c.path(3, "d", "moved"))
        assert os.listdir(c.path(1, "d")) == ["moved"]
        assert os.stat(c.path(2, "d", "moved")).st_size == 15000
        os.unlink(c.path(2, "from3"))
        assert "from3" not in os.listdir(c.path(3))


def test_a_proxys_read_ahead_never_serves_bytes_another_node_wrote_since(tmp_path):
    """Node 3 (proxied) reads a file sequentially: its proxy reads the next pieces
    ahead, side by side. Node 1 then overwrites pieces in place further on, without
    fsync: node 3's next read of each piece sees it (the data lock node 1 takes drops
    node 3's pieces), and a sequential pass after reads exactly the file."""
    with ProxyCluster(tmp_path) as c:
        size = 24 * MIB
        _write(c.path(1, "f"), b"A" * size)
        reader = os.open(c.path(3, "f"), os.O_RDONLY)
        writer = os.open(c.path(1, "f"), os.O_WRONLY)
        try:
            for off in range(0, 4 * MIB, MIB):           # a sequential reader
                assert os.pread(reader, MIB, off) == b"A" * MIB
            assert status(c, 3)["device"]["read_ahead"] > 0
            pieces = [4 * MIB + 4096, 5 * MIB - 100, 9 * MIB + 123, (2 * MIB)]
            for n, off in enumerate(pieces):
                new = bytes([ord("a") + n]) * 4096
                assert os.pwrite(writer, new, off) == len(new)
                assert os.pread(reader, len(new), off) == new, f"stale at {off}"
            got = bytearray()
            for off in range(0, size, MIB):
                got += os.pread(reader, MIB, off)
            want = bytearray(b"A" * size)
            for n, off in enumerate(pieces):
                want[off : off + 4096] = bytes([ord("a") + n]) * 4096
            assert got == want
            assert status(c, 3)["device"]["read_ahead_used"] > 0
        finally:
            os.close(reader)
            os.close(writer)


def _kernel_split_writes(c: Cluster) -> None:
    """1 MiB write()s on node 3 from a buffer 16 bytes past a page edge (malloc's):
    the kernel splits each into 1 MiB - 16 bytes and 16, and the proxy's queued run
    takes the block the first ends inside again, whole, from the second (the older
    copy never sent). Every byte reads back on the nodes with their own path."""
    buf = mmap.mmap(-1, 4 * MIB + 4096)
    data = blob("split", 4 * MIB)
    buf[16 : 16 + len(data)] = data
    before = status(c, 3)["device"]["superseded"]
    fd = os.open(c.path(3, "split"), os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        for i in range(4):
            os.write(fd, memoryview(buf)[16 + i * MIB : 16 + (i + 1) * MIB])
        os.fsync(fd)
    finally:
        os.close(fd)
    assert status(c, 3)["device"]["superseded"] > before
    for n in (1, 2):
        with open(c.path(n, "split"), "rb") as f:
            assert f.read() == data, n


def _write(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _served_node3(c: Cluster, server: int) -> int:
    return status(c, server)["block_server"]["per_node"].get("3", 0)


def test_grants_name_the_servers_the_proxys_io_goes_to(tmp_path):
    """Every lock grant names the preferred server of its resource, spread over the
    live servers; node 3 routes the I/O of each region (its journal, a resource
    group, the fixed area) to what the grant of the region's lock named, so its I/O
    reaches both servers. Once a server dies, the grants name the other."""
    with ProxyCluster(tmp_path) as c:
        _write(c.path(3, "spread"), blob("spread", 4 * MIB))
        st = status(c, 3)
        named, routes = st["preferred_servers"], st["device"]["preferred"]
        print(f"\nnode 3's grants name: {named}")
        journal = f"journal:{st['mount']['slot']}"
        assert {"live", journal} <= set(named)          # held from mount to unmount
        for key, server in named.items():
            assert server == server_order(key.encode(), [1, 2])[0], key   # the master's
            assert routes[key] == server, key             # what the proxy routes by
        assert set(named.values()) == {1, 2}
        assert st["device"]["to_named"] > 0
        assert _served_node3(c, 1) > 0 and _served_node3(c, 2) > 0, st["device"]
        # the server node 3's journal grant names dies: every grant names the other
        victim = named[journal]
        other = 3 - victim
        c.kill9(victim)
        wait_view(c, 3, [other, 3])
        _write(c.path(3, "after"), blob("after", MIB))      # new grants, too
        st = status(c, 3)
        assert set(st["preferred_servers"].values()) == {other}, st["preferred_servers"]
        assert set(st["device"]["preferred"].values()) == {other}
        before = _served_node3(c, other)
        with open(c.path(3, "spread"), "rb") as f:
            assert f.read() == blob("spread", 4 * MIB)
        assert _served_node3(c, other) > before


WRITER = r"""
import hashlib, os, sys, time
path, chunks, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
""" + BLOB + r"""fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
for r in range(rounds):
    for k in range(chunks):
        os.pwrite(fd, blob(f"{r}-{k}", 1 << 20), k << 20)
        os.fsync(fd)
        print(r, k, time.time(), flush=True)
    if r == 0:
        sys.stdin.readline()              # the test stops a server here
print("done", flush=True)
"""


def _expected(chunks: int, rounds: int) -> bytes:
    return b"".join(blob(f"{rounds - 1}-{k}", MIB) for k in range(chunks))


def _busiest_server(before: dict, after: dict) -> int:
    delta = {int(s): after[s] - before.get(s, 0) for s in after}
    return max(delta, key=delta.get)


def _write_and_stop(c: Cluster, chunks: int, rounds: int, stop_for: float | None):
    """A writer on node 3 rewrites `chunks` MiB `rounds` times with an fsync after
    every MiB; after its first round the server node 3 used most is SIGSTOPped
    (and let go after `stop_for` s, or left stopped). (server, stop time, writer
    output lines)."""
    # the counts before the writer starts: its first round may be over (its writes
    # queued and answered later, several at once) before a status call here returns
    before = status(c, 3)["device"]["written"]
    w = subprocess.Popen([sys.executable, "-c", WRITER, c.path(3, "w"), str(chunks),
                          str(rounds)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         text=True)
    lines = []
    try:
        lines += [w.stdout.readline() for _ in range(chunks)]
        after = status(c, 3)["device"]["written"]
        server = _busiest_server(before, after)
        print(f"\nwritten through each server before/after round 0: {before} {after}")
        victim = c.mounts[server]
        stopped_at = time.time()
        os.kill(victim.pid, signal.SIGSTOP)
        w.stdin.write("go\n")
        w.stdin.flush()
        if stop_for is not None:
            time.sleep(stop_for)
            os.kill(victim.pid, signal.SIGCONT)
        out, _ = w.communicate(timeout=180)
    finally:
        if w.poll() is None:
            w.kill()
    lines += out.splitlines()
    assert w.returncode == 0 and lines[-1].strip() == "done", (lines[-3:], c.logs())
    return server, stopped_at, lines


def test_sigstop_of_the_proxys_server_retargets_without_an_error(tmp_path):
    """The server stays stopped: node 3 re-targets within io_timeout, tells membership
    to look at the silent server and asks for new preferred servers; the survivors
    probe it, remove it without waiting out the failure timeout, fence it (the dev
    cluster's process agent kills it) and recover; no error reaches the writer and
    every byte verifies."""
    chunks, rounds = 4, 6
    with ProxyCluster(tmp_path) as c:
        server, stopped_at, _lines = _write_and_stop(c, chunks, rounds, None)
        other = 3 - server
        dev = status(c, 3)["device"]
        assert dev["retargets"] >= 1 and dev["timeouts"] >= 1, dev
        first = min(t for t in dev["retarget_times"] if t >= stopped_at)
        print(f"\nSIGSTOP of server {server} -> first re-targeted I/O: "
              f"{first - stopped_at:.3f} s (io_timeout {IO_TIMEOUT} s)")
        assert first - stopped_at < 10 * IO_TIMEOUT
        print(f"writes maybe in flight on the stopped server: "
              f"{dev.get('maybe_in_flight')}, newer ones held behind them: {dev.get('held')}")
        done = [float(line.split()[2]) for line in _lines if len(line.split()) == 3]
        after = [t for t in done if t >= stopped_at]
        gaps = [b - a for a, b in zip([stopped_at, *after], after, strict=False)]
        print(f"longest write + fsync of a MiB after the stop: {max(gaps):.2f} s")
        expect = _expected(chunks, rounds)
        for n in (3, other):
            with open(c.path(n, "w"), "rb") as f:
                assert f.read() == expect, n
        victim = c.mounts[server]
        deadline = time.monotonic() + 60
        while victim.alive() and time.monotonic() < deadline:   # fenced: killed
            time.sleep(0.2)
        assert not victim.alive(), c.logs()
        print(f"stopped server fenced (killed) {time.time() - stopped_at:.1f} s after the "
              "stop (polled every 0.2 s)")
        c.mounts.pop(server).clean_after_crash()
        # node 3 told membership to look at the silent server and asked the masters to
        # name another one; the coordinator probed it and took it for dead at once
        log3, log_other = c.mounts[3].log_text(), c.mounts[other].log_text()
        assert f"node {server} is suspected silent" in log3, log3[-3000:]
        assert f"(avoiding [{server}])" in log3, log3[-3000:]
        assert f"node 3 suspects node {server}; probing it" in log_other, log_other[-3000:]
        assert f"node {server} did not answer our probe" in log_other, log_other[-3000:]
        with open(c.path(3, "after"), "wb") as f:        # one server left: still serving
            f.write(b"x" * 100000)
            f.flush()
            os.fsync(f.fileno())
        with open(c.path(other, "after"), "rb") as f:
            assert f.read() == b"x" * 100000


REWRITER = r"""
import hashlib, os, sys
path, stop = sys.argv[1], sys.argv[2]
""" + BLOB + r"""fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
r = 0
while not os.path.exists(stop):
    os.pwrite(fd, blob(f"round-{r}", 1 << 20), 0)
    os.fsync(fd)
    print(r, flush=True)
    r += 1
print("last", r - 1, flush=True)
"""


def _rewrite_with_busiest_server_stopped(c: Cluster, tmp_path, while_stopped,
                                        let_go_first: bool = False):
    """Node 3 runs REWRITER; after its third round the server it wrote through most is
    SIGSTOPped, `while_stopped()` runs, the writer is told to stop and waited for, and
    only then is the server let go (SIGCONT; with `let_go_first`, before the writer
    is told). Returns (that server, the writer's output, its exit code, what
    while_stopped returned)."""
    stop = tmp_path / "stop-writing"
    w = subprocess.Popen([sys.executable, "-c", REWRITER, c.path(3, "w"), str(stop)],
                         stdout=subprocess.PIPE, text=True)
    try:
        before = status(c, 3)["device"]["written"]
        for _ in range(3):
            w.stdout.readline()
        server = _busiest_server(before, status(c, 3)["device"]["written"])
        victim = c.mounts[server]
        os.kill(victim.pid, signal.SIGSTOP)
        try:
            result = while_stopped()
            if let_go_first:
                os.kill(victim.pid, signal.SIGCONT)
            stop.touch()
            out, _ = w.communicate(timeout=60)
        finally:
            os.kill(victim.pid, signal.SIGCONT)
    finally:
        if w.poll() is None:
            w.kill()
    return server, out, w.returncode, result


def test_a_briefly_stopped_server_writes_nothing_stale(tmp_path):
    """The server is let go before the cluster notices: node 3 suspects it once its
    I/O times out (io_timeout 0.5 s), and membership would remove it if it left the
    probe unanswered for probe_timeout (1 s) more; it is let go 0.9 s after the stop.
    A writer on node 3 rewrites one MiB again and again; while the server is
    stopped, node 3 re-targets and rewrites it, then the server is let go, then the
    writer stops: the older copy that waited in its socket must not land over the
    newer ones. (A rewrite over a write the stopped server took and did not answer,
    maybe in flight there, is held and the writer's fsync waits for that server:
    storage/proxy.py. So the server is let go before the writer is told to stop;
    the other way round, the fsync would keep it stopped until membership removed
    it.)"""
    with ProxyCluster(tmp_path) as c:
        # re-target, and rewrite meanwhile
        server, out, rc, _ = _rewrite_with_busiest_server_stopped(
            c, tmp_path, lambda: time.sleep(0.9), let_go_first=True)
        last = out.splitlines()[-1].split()
        assert last[0] == "last" and rc == 0, (out, c.logs())
        time.sleep(1.0)                               # the late copy would land now
        st = status(c, server)["block_server"]
        assert st["stalls"] >= 1, st
        assert status(c, 3)["device"]["retargets"] >= 1
        expect = blob(f"round-{last[1]}", MIB)
        for n in (1, 2, 3):
            with open(c.path(n, "w"), "rb") as f:
                assert f.read() == expect, (n, st)


def _loop_lags(control: str, seconds: float) -> list[tuple[float, float]]:
    """Ask `control` for its status again and again for `seconds`: (when asked, how
    long the answer took) for each. The status is served on the mount's event loop,
    so a long answer is a loop that was held."""
    from clusterfs.node.lockd_cmd import ControlClient

    lags = []
    end = time.monotonic() + seconds
    with ControlClient(control, timeout=30) as client:
        while time.monotonic() < end:
            asked = time.monotonic()
            assert client.call("status")["ok"]
            lags.append((asked, time.monotonic() - asked))
            time.sleep(0.02)
    return lags


def test_the_proxys_loop_stays_live_while_its_server_is_stopped(tmp_path):
    """Node 3 rewrites and fsyncs one MiB again and again; the server it writes
    through most is SIGSTOPped. Node 3's requests to it wait out io_timeout (0.5 s)
    before they are re-targeted, and that wait must not hold node 3's event loop:
    its control socket (served on that loop, as its lock service and its comms are)
    answers every status request within a bound well under io_timeout meanwhile.
    (Before: the fs's device calls ran on the loop's thread, and a status request
    waited up to io_timeout and more.)"""
    with ProxyCluster(tmp_path) as c:
        server, out, rc, lags = _rewrite_with_busiest_server_stopped(
            c, tmp_path, lambda: _loop_lags(c.control(3), 2.5))
        assert rc == 0 and out.splitlines()[-1].startswith("last"), (out, c.logs())
        dev = status(c, 3)["device"]
        assert dev["retargets"] >= 1 and dev["timeouts"] >= 1, dev
        worst = max(lags, key=lambda x: x[1])
        print(f"\nnode 3's status answers while server {server} was stopped: "
              f"{len(lags)}, slowest {worst[1]:.3f} s ({worst[0] - lags[0][0]:.2f} s "
              f"after the stop); io_timeout {IO_TIMEOUT} s")
        assert worst[1] < IO_TIMEOUT / 2, lags
        expect_last = out.splitlines()[-1].split()[1]
        with open(c.path(3, "w"), "rb") as f:
            assert f.read() == blob(f"round-{expect_last}", MIB)
        wait_fenced(c, server)

