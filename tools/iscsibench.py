#!/usr/bin/env python3
"""IscsiDevice and ProxyDevice against BlockDevice on equal backing files: 1 MiB
sequential and 4 KiB random I/O, each measured `--runs` times, and the time a proxy
takes to re-target a write when its server is SIGSTOPped (issue 8, item 7).

Both files are sparse files of the same size in one new /tmp/iscsi-bench-* directory:
one opened directly as a BlockDevice, the other exported as a LUN by a private tgtd
on 127.0.0.1 (tests/iscsiutil.py) and opened as iscsi://... So both go through the
same filesystem and page cache; the difference is tgtd plus the iSCSI session (one
synchronous command at a time, as IscsiDevice issues them). The proxy row goes
through a block server (clusterfs.storage.blockserver, in a process of its own,
serving a third equal file as a BlockDevice) over authenticated frames on
127.0.0.1, from a ProxyDevice in this process: the difference is the proxy
protocol. Re-target: two block servers serve one file, the proxy writes 4 KiB
blocks (and a flush) to its preferred server,
that server is SIGSTOPped, and the time to the first write that completes after
the stop is taken (io_timeout set by --io-timeout), --retargets times.

    seq write   SIZE in 1 MiB writes, then flush (fsync / SYNCHRONIZE CACHE)
    seq read    SIZE in 1 MiB reads (the data just written: warm page cache on both)
    rand write  COUNT 4 KiB writes at random block addresses, then flush
    rand read   COUNT 4 KiB reads at random block addresses
    queued      the same seq write and rand write through `write_behind` and `drain`
                (how a mount writes file data: BlockDevice queues to its
                write-behind thread, ProxyDevice sends without waiting for each
                reply, up to its window; IscsiDevice writes at once)

Run as root: python3 tools/iscsibench.py [--size-mib 256] [--count 4000] [--runs 2]
Everything it starts (tgtd) and makes (the directory) is removed at the end.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

import iscsiutil  # noqa: E402

from clusterfs.comms.localcluster import free_ports  # noqa: E402
from clusterfs.config import parse_config  # noqa: E402
from clusterfs.dlm.preferred import server_order  # noqa: E402
from clusterfs.storage.device import BlockDevice  # noqa: E402
from clusterfs.storage.iscsi import IscsiDevice  # noqa: E402
from clusterfs.storage.proxy import UNMAPPED, ProxyDevice  # noqa: E402

MIB = 1 << 20
BLOCK = 4096


def timed_writes(dev, write, offsets, data: bytes) -> float:
    """Seconds to write `data` at every offset with `write` (dev.pwrite, or
    dev.write_behind) and have it all on the device: queued writes drained, flushed."""
    t = time.perf_counter()
    for off in offsets:
        write(off, data)
    dev.drain()
    dev.flush()
    return time.perf_counter() - t


def measure(dev, size: int, count: int, seed: int) -> dict[str, float]:
    out = {}
    seq = range(0, size, MIB)
    out["seq write MiB/s"] = size / MIB / timed_writes(dev, dev.pwrite, seq, os.urandom(MIB))

    t = time.perf_counter()
    for off in range(0, size, MIB):
        if len(dev.pread(off, MIB)) != MIB:
            raise SystemExit("short read")
    out["seq read MiB/s"] = size / MIB / (time.perf_counter() - t)

    rng = random.Random(seed)
    blocks = [rng.randrange(size // BLOCK) for _ in range(count)]
    offsets = [b * BLOCK for b in blocks]
    out["4k rand write IOPS"] = count / timed_writes(dev, dev.pwrite, offsets,
                                                     os.urandom(BLOCK))

    rng.shuffle(blocks)
    t = time.perf_counter()
    for b in blocks:
        dev.pread(b * BLOCK, BLOCK)
    out["4k rand read IOPS"] = count / (time.perf_counter() - t)
    out.update(measure_queued(dev, size, blocks))
    return out


def measure_queued(dev, size: int, blocks: list[int]) -> dict[str, float]:
    """Writes queued with write_behind, then drain and flush."""
    seq = timed_writes(dev, dev.write_behind, range(0, size, MIB), os.urandom(MIB))
    rand = timed_writes(dev, dev.write_behind, [b * BLOCK for b in blocks],
                        os.urandom(BLOCK))
    return {"seq write queued MiB/s": size / MIB / seq,
            "4k rand write queued IOPS": len(blocks) / rand}


# -- proxy I/O -----------------------------------------------------------------------
PROXY_NODE = 3


def bench_config(ports: list[int], io_timeout: float):
    """A cluster config: nodes 1 and 2 serve (block servers on ports[2:4]), 3 proxies."""
    return parse_config({
        "name": "bench", "key": os.urandom(32).hex(),
        "timeouts": {"failure_timeout": max(3.0, 2 * io_timeout)},
        "node": [{"id": i, "address": f"127.0.0.1:{ports[i - 1]}"} for i in (1, 2, 3)],
        "storage": {"group": [1, 2], "io_timeout": io_timeout,
                    "servers": {"1": f"127.0.0.1:{ports[3]}", "2": f"127.0.0.1:{ports[4]}"}},
    })


class StaticMembership:
    """One view of all three nodes that never changes (the bench has no cluster)."""

    def __init__(self) -> None:
        from clusterfs.membership.view import View

        self.view = View(1, frozenset({1, 2, 3}), True, 3)

    def subscribe(self):
        import trio

        from clusterfs.membership.view import ViewChange

        send, recv = trio.open_memory_channel(1)
        send.send_nowait(ViewChange(self.view, self.view.members, frozenset()))
        return recv


# TEST HOOK (tests/test_blockserver.py), off by default: with
# CLUSTERFS_TEST_SLOW_WRITE=OFFSET:SECONDS in its environment, a --serve process's
# first device write at byte OFFSET takes SECONDS longer (a disk that stalls on one
# write the server started in time: after its `by` check), and says `slow write
# landed` on stdout once it is on the device. A stall longer than the server's
# disk_timeout is a hung disk: the server says `disk hung: WHY` on stdout and
# fences itself as a mount's would (node/storagegroup.py's fence_self).
SLOW_WRITE_ENV = "CLUSTERFS_TEST_SLOW_WRITE"


class _SlowOnce:
    """A BlockDevice whose first write at one offset stalls (the test hook above)."""

    def __init__(self, dev: BlockDevice, offset: int, seconds: float) -> None:
        self.dev, self.offset, self.seconds = dev, offset, seconds
        self.size = dev.size

    def pwrite(self, offset: int, data) -> None:
        if offset != self.offset or self.seconds <= 0:
            self.dev.pwrite(offset, data)
            return
        seconds, self.seconds = self.seconds, 0.0
        time.sleep(seconds)
        self.dev.pwrite(offset, data)
        print("slow write landed", flush=True)

    def __getattr__(self, name: str):
        return getattr(self.dev, name)


def _hung(node_id: int, why: str) -> None:
    """The server's disk hangs: say so (the tests read it), then stop as a mount does."""
    from clusterfs.node.storagegroup import fence_self

    print(f"disk hung: {why}", flush=True)
    fence_self(node_id, why)


def serve(path: str, node_id: int, ports: list[int], io_timeout: float, key: str) -> None:
    """The block server of `node_id` on `path` (run in a child process)."""
    import dataclasses

    import trio

    from clusterfs.storage.blockserver import BlockServer

    cfg = dataclasses.replace(bench_config(ports, io_timeout), key=bytes.fromhex(key))
    dev = BlockDevice(path)
    slow = os.environ.get(SLOW_WRITE_ENV)
    if slow:                              # a test hook, off unless the variable is set
        offset, seconds = slow.split(":")
        dev = _SlowOnce(dev, int(offset), float(seconds))

    async def run() -> None:
        server = BlockServer(cfg, node_id, dev, StaticMembership())
        server.on_disk_hung = lambda why: _hung(node_id, why)
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve)
            print("serving", flush=True)

    trio.run(run)


class Servers:
    """Block server child processes, killed (by pid) at the end."""

    def __init__(self, path: Path, ports: list[int], io_timeout: float, key: bytes,
                 nodes: tuple[int, ...]) -> None:
        import subprocess

        self.procs = {}
        for n in nodes:
            p = subprocess.Popen([sys.executable, __file__, "--serve", str(path), str(n),
                                  ",".join(map(str, ports)), str(io_timeout), key.hex()],
                                 stdout=subprocess.PIPE, text=True)
            self.procs[n] = p
            if p.stdout.readline().strip() != "serving":
                self.close()
                raise SystemExit(f"block server {n} did not start")

    def kill(self, node: int) -> None:
        """SIGKILL server `node` (stopped or not), as a cluster's fencing would."""
        import signal

        p = self.procs[node]
        if p.poll() is None:
            os.kill(p.pid, signal.SIGKILL)
        p.wait()

    def close(self) -> None:
        import signal

        for p in self.procs.values():
            if p.poll() is None:
                os.kill(p.pid, signal.SIGCONT)
                os.kill(p.pid, signal.SIGKILL)
            p.wait()


def open_proxy(path: Path, io_timeout: float, nodes: tuple[int, ...] = (1,)):
    """A ProxyDevice on `path` through block servers `nodes`; (device, servers, cfg)."""
    ports = free_ports(5)
    cfg = bench_config(ports, io_timeout)
    servers = Servers(path, ports, io_timeout, cfg.key, nodes)
    try:
        dev = ProxyDevice(cfg, PROXY_NODE)
        dev.attach(lambda: (1, frozenset({*nodes, PROXY_NODE})))
    except BaseException:
        servers.close()
        raise
    return dev, servers, cfg


def retarget_times(path: Path, io_timeout: float, times: int) -> list[float]:
    """Seconds from SIGSTOP of the preferred server to the proxy's next completed write."""
    import signal

    out = []
    for _ in range(times):
        dev, servers, _cfg = open_proxy(path, io_timeout, (1, 2))
        try:
            offset = 0
            victim = server_order(UNMAPPED, [1, 2])[0]    # no route_by: one order
            block = os.urandom(BLOCK)
            for i in range(64):                     # warm up: connected, written, flushed
                dev.pwrite(offset + i * BLOCK, block)
            dev.flush()
            os.kill(servers.procs[victim].pid, signal.SIGSTOP)
            stopped = time.perf_counter()
            dev.pwrite(offset, block)
            out.append(time.perf_counter() - stopped)
            # the write the stopped server took stays unsettled (it may still land)
            # until that server answers, closes or is fenced: in a cluster the others
            # fence it; here its death closes the connection, and the flush can go on
            servers.kill(victim)
            dev.flush()
            assert dev.statistics()["retargets"] >= 1
        finally:
            dev.close()
            servers.close()
    return out


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--serve":
        path, node, ports, io_timeout, key = sys.argv[2:7]
        serve(path, int(node), [int(p) for p in ports.split(",")], float(io_timeout), key)
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--count", type=int, default=4000, help="random 4 KiB operations")
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--io-timeout", type=float, default=0.5,
                    help="the proxy's io_timeout for the re-target figure (seconds)")
    ap.add_argument("--retargets", type=int, default=5)
    args = ap.parse_args()
    why = iscsiutil.missing_prerequisites()
    if why:
        print(f"iscsibench: {why}", file=sys.stderr)
        return 1
    size = args.size_mib * MIB
    work = Path(tempfile.mkdtemp(prefix="iscsi-bench-", dir="/tmp"))
    try:
        plain, served = work / "plain.img", work / "served.img"
        for path in (plain, served):
            with open(path, "wb") as f:
                f.truncate(size)
        with iscsiutil.target([size], workdir=work) as target:
            print(f"backing files: {size // MIB} MiB each in {work}; LUN {target.url()}")
            rows: dict[str, list[str]] = {}
            for run in range(1, args.runs + 1):
                local: dict[str, float] = {}
                for name, opener in (("BlockDevice", lambda: (BlockDevice(str(plain)), None)),
                                     ("IscsiDevice", lambda: (IscsiDevice(target.url()), None)),
                                     ("ProxyDevice", lambda: open_proxy(served, 5.0)[:2])):
                    dev, servers = opener()
                    try:
                        result = measure(dev, size, args.count, seed=run)
                    finally:
                        dev.close()
                        if servers is not None:
                            servers.close()
                    for what, value in result.items():
                        local.setdefault(what, value)
                        ratio = f" ({value / local[what]:.3f})" if name != "BlockDevice" else ""
                        rows.setdefault(what, []).append(
                            f"{name[:5]} #{run}: {value:8.0f}{ratio}")
            for what, cells in rows.items():
                print(f"{what:20s} " + "   ".join(cells))
        times = retarget_times(served, args.io_timeout, args.retargets)
        print(f"re-target after SIGSTOP of the server (io_timeout {args.io_timeout:g} s): "
              + ", ".join(f"{t:.3f}" for t in times) + " s")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
