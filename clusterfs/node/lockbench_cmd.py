"""`clusterfs lockbench`: benchmark the lock service on a local cluster.

Self-contained: starts its own lockd processes on 127.0.0.1 with a temporary
config and key, measures, and stops them (also on failure). Prints:
  - uncontended lock+unlock per second on a locally mastered resource;
  - remote request round trip (request -> grant) p50/p99 over loopback;
  - ping-pong handovers per second of one EX lock between two nodes.

`LocalLockCluster` is also what the multi-process tests use.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from clusterfs.node.lockd_cmd import ControlClient


class LocalLockCluster:
    """lockd processes on 127.0.0.1, one per node id, each with a control socket.

    Every process started here is stopped by close() (SIGTERM, then SIGKILL);
    no other process is ever signalled by this class. The lockd processes fence
    each other for real: each records itself in `fence_dir/node<ID>.pid`, and the
    coordinator SIGKILLs a dead node's recorded process (ProcessAgent) before
    lock recovery may go on."""

    def __init__(self, node_ids: list[int], *, workdir: str | None = None,
                 heartbeat_interval: float = 0.2, failure_timeout: float = 1.5,
                 dead_on_refusal: bool = True, verbose: bool = False,
                 answer_timeout: float | None = None,
                 probe_timeout: float | None = None) -> None:
        from clusterfs.comms.localcluster import write_local_config

        self._own_dir = workdir is None
        self.dir = Path(workdir or tempfile.mkdtemp(prefix="cfs-lockd-"))
        self.node_ids = list(node_ids)
        self.config_path = self.dir / "cluster.toml"
        self.fence_dir = self.dir / "fence"
        # each node's generation record (survives a restart of the whole cluster)
        self.state_dir = self.dir / "state"
        self.state_dir.mkdir(exist_ok=True)
        write_local_config(self.config_path, self.node_ids,
                           heartbeat_interval=heartbeat_interval,
                           failure_timeout=failure_timeout,
                           dead_on_refusal=dead_on_refusal,
                           answer_timeout=answer_timeout, probe_timeout=probe_timeout)
        self.verbose = verbose
        self.procs: dict[int, subprocess.Popen[bytes]] = {}

    def control(self, node_id: int) -> str:
        return str(self.dir / f"lockd-{node_id}.sock")

    def start(self, node_id: int) -> None:
        log = open(self.dir / f"lockd-{node_id}.log", "ab")
        cmd = [sys.executable, "-m", "clusterfs.cli", "lockd", "--config",
               str(self.config_path), "--node-id", str(node_id),
               "--control", self.control(node_id), "--fence-pid-dir", str(self.fence_dir),
               "--state-dir", str(self.state_dir)]
        if self.verbose:
            cmd.append("-v")
        self.procs[node_id] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log,
                                               stdin=subprocess.DEVNULL)
        log.close()

    def wait_ready(self, node_id: int, timeout: float = 30) -> None:
        proc = self.procs[node_id]
        assert proc.stdout is not None
        deadline = time.monotonic() + timeout
        line = b""
        while time.monotonic() < deadline:
            r, _, _ = select.select([proc.stdout], [], [], 0.2)
            if r:
                line = proc.stdout.readline()
                if line and json.loads(line).get("event") == "ready":
                    return
            if proc.poll() is not None:
                raise RuntimeError(f"lockd {node_id} exited: {self.log_tail(node_id)}")
        raise TimeoutError(f"lockd {node_id} not ready: {self.log_tail(node_id)}")

    def wait_running(self, node_ids: list[int] | None = None, timeout: float = 30) -> None:
        """Until every node's lockspace runs in a view holding all of node_ids."""
        want = sorted(node_ids or self.procs)
        deadline = time.monotonic() + timeout
        while True:
            ok = True
            for nid in want:
                try:
                    with ControlClient(self.control(nid)) as c:
                        st = c.call("status")
                except OSError:
                    ok = False
                    continue
                if not (st["running"] and st["members"] == want):
                    ok = False
            if ok:
                return
            if time.monotonic() > deadline:
                detail = []
                for nid in want:
                    alive = nid in self.procs and self.procs[nid].poll() is None
                    detail.append(f"node {nid} alive={alive}: " +
                                  self.log_tail(nid, 600).replace("\n", "\n    "))
                raise TimeoutError(f"cluster {want} not running\n" + "\n".join(detail))
            time.sleep(0.1)

    def start_all(self) -> LocalLockCluster:
        for nid in self.node_ids:
            self.start(nid)
        for nid in self.node_ids:
            self.wait_ready(nid)
        self.wait_running()
        return self

    def kill(self, node_id: int) -> None:
        """kill -9 one of our lockd processes."""
        proc = self.procs.pop(node_id)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if proc.stdout:
            proc.stdout.close()

    def log_tail(self, node_id: int, n: int = 2000) -> str:
        try:
            return (self.dir / f"lockd-{node_id}.log").read_bytes()[-n:].decode(errors="replace")
        except OSError:
            return ""

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for nid, proc in list(self.procs.items()):
            try:
                proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stdout:
                proc.stdout.close()
            del self.procs[nid]
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> LocalLockCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nodes", type=int, default=3, help="lockd processes (>= 2)")
    p.add_argument("--ops", type=int, default=20000, help="local lock+unlock pairs")
    p.add_argument("--remote-ops", type=int, default=3000, help="remote round trips")
    p.add_argument("--seconds", type=float, default=3.0, help="ping-pong duration")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def bench(nodes: int = 3, ops: int = 20000, remote_ops: int = 3000,
          seconds: float = 3.0) -> dict[str, Any]:
    if nodes < 2:
        raise ValueError(f"nodes={nodes}: a lock-service benchmark needs at least 2")
    ids = list(range(1, nodes + 1))
    with LocalLockCluster(ids) as cl:
        cl.start_all()
        c1 = ControlClient(cl.control(1), timeout=600)
        c2 = ControlClient(cl.control(2), timeout=600)
        try:
            local = c1.call("bench", kind="local", n=ops, name=["bench-local", 1])
            # node 1 masters "bench-remote" (it asks first); node 2 measures
            r = c1.call("lock", name=["bench-remote"], mode="NL")
            c1.call("unlock", handle=r["handle"])
            remote = c2.call("bench", kind="remote", n=remote_ops, name=["bench-remote"])
            # ping-pong between nodes 2 and 3 (or 1 and 2) on a lock node 1 masters
            a, b = (2, 3) if len(ids) >= 3 else (1, 2)
            r = c1.call("lock", name=["pingpong"], mode="NL")
            c1.call("unlock", handle=r["handle"])
            results: dict[int, dict[str, Any]] = {}

            def run(nid: int) -> None:
                with ControlClient(cl.control(nid), timeout=seconds + 60) as c:
                    results[nid] = c.call("pingpong", name=["pingpong"], seconds=seconds)

            threads = [threading.Thread(target=run, args=(n,)) for n in (a, b)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        finally:
            c1.close()
            c2.close()
        for res in (local, remote, *results.values()):
            if not res.get("ok"):
                raise RuntimeError(f"benchmark failed: {res}")
        total = sum(r["acquisitions"] for r in results.values())
        return {
            "nodes": len(ids),
            "local_lock_unlock_per_s": round(local["ops_per_s"]),
            "remote_rtt_p50_us": round(remote["p50_us"], 1),
            "remote_rtt_p99_us": round(remote["p99_us"], 1),
            "pingpong_handovers_per_s": round(total / seconds, 1),
        }


def check_arguments(args: argparse.Namespace) -> str | None:
    """What is wrong with the arguments, or None."""
    if args.nodes < 2:
        return f"--nodes {args.nodes}: need at least 2 lockd processes (remote requests)"
    for flag, value in (("--ops", args.ops), ("--remote-ops", args.remote_ops)):
        if value <= 0:
            return f"{flag} {value}: must be a positive count"
    if not args.seconds > 0:          # also refuses NaN
        return f"--seconds {args.seconds}: must be a positive duration"
    return None


def run(args: argparse.Namespace) -> int:
    problem = check_arguments(args)
    if problem is not None:
        print(f"clusterfs lockbench: {problem}", file=sys.stderr)
        return 2
    res = bench(args.nodes, args.ops, args.remote_ops, args.seconds)
    if args.json:
        print(json.dumps(res))
        return 0
    print(f"lockbench: {res['nodes']} lockd processes on 127.0.0.1 (pid {os.getpid()})")
    print(f"  uncontended lock+unlock, locally mastered: {res['local_lock_unlock_per_s']:>10} /s")
    print(f"  remote request round trip p50:             {res['remote_rtt_p50_us']:>10} us")
    print(f"  remote request round trip p99:             {res['remote_rtt_p99_us']:>10} us")
    print(f"  EX ping-pong handovers between two nodes:  "
          f"{res['pingpong_handovers_per_s']:>10} /s")
    return 0
