#!/usr/bin/env python3
"""A local lock-service cluster, driven the way a user would: the demo's second half.

Starts N `clusterfs lockd` processes on 127.0.0.1 (temporary config and key),
shows `clusterfs status`, lets node K (--kill, 2..N) take an EX lock (a
writer: it may change the value block) while node 1 waits for PR on the same
resource (polled with `locks` until queued), kills the holder with kill -9,
and shows node 1 granted after recovery with the value block marked invalid
(lvb_valid is False, checked: a dead writer may have changed what it
protected), the view's generation grown and the dead node gone. The survivors
fence the dead node before recovery (ProcessAgent: its recorded process,
checked and found gone). Everything started here is stopped on exit, also on
failure.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import threading
import time
from typing import Any

from clusterfs.node.lockbench_cmd import LocalLockCluster
from clusterfs.node.lockd_cmd import ControlClient

RESOURCE = "inode:42"
WAIT_SECONDS = 30        # bounds every wait below; the demo fails past it


def show_status(cluster: LocalLockCluster, node_id: int) -> None:
    print(f"$ clusterfs status --control {cluster.control(node_id)}", flush=True)
    subprocess.run([sys.executable, "-m", "clusterfs.cli", "status",
                    "--control", cluster.control(node_id)], check=True)


def show_locks(cluster: LocalLockCluster, node_id: int, name: str) -> None:
    print(f"$ clusterfs locks --control {cluster.control(node_id)} {name}", flush=True)
    subprocess.run([sys.executable, "-m", "clusterfs.cli", "locks",
                    "--control", cluster.control(node_id), name], check=True)


def wait_until_queued(cluster: LocalLockCluster, node_id: int, name: str) -> None:
    """Poll `locks` until node_id's request waits on name (its master has queued it)."""
    deadline = time.monotonic() + WAIT_SECONDS
    with ControlClient(cluster.control(node_id)) as c:
        while True:
            res = c.call("locks", name=name)
            if res.get("ok") and any(lk["node"] == node_id and lk["queue"] == "waiting"
                                     for lk in res["locks"]):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"node {node_id}'s request on {name} never queued: {res}")
            time.sleep(0.05)


def start_waiter(cluster: LocalLockCluster, result: dict[str, Any]) -> threading.Thread:
    """Node 1 asks for PR on RESOURCE in a thread; the answer lands in result."""
    def waiter() -> None:
        with ControlClient(cluster.control(1), timeout=WAIT_SECONDS + 10) as c:
            result.update(c.call("lock", name=RESOURCE, mode="PR", timeout=WAIT_SECONDS))

    thread = threading.Thread(target=waiter, daemon=True)
    thread.start()
    return thread


def check_granted(result: dict[str, Any]) -> bool:
    if not result.get("ok"):
        print(f"node 1 never got its lock: {result}", file=sys.stderr)
        return False
    if result["lvb_valid"] is not False:
        print(f"node 1 got the value block marked valid after its EX holder died: {result}",
              file=sys.stderr)
        return False
    print(f"node 1: PR granted after recovery; lvb_valid={result['lvb_valid']} "
          f"(the dead EX holder may have changed it)")
    return True


def demo(nodes: int, victim: int) -> int:
    with LocalLockCluster(list(range(1, nodes + 1))) as cluster:
        cluster.start_all()
        show_status(cluster, 1)
        with ControlClient(cluster.control(victim)) as holder:
            granted = holder.call("lock", name=RESOURCE, mode="EX")
            if not granted.get("ok"):
                print(f"node {victim} could not lock {RESOURCE}: {granted}", file=sys.stderr)
                return 1
            print(f"node {victim}: EX on {RESOURCE} granted "
                  f"(a writer: it may change the value block)")
            result: dict[str, Any] = {}
            thread = start_waiter(cluster, result)
            wait_until_queued(cluster, 1, RESOURCE)
            show_locks(cluster, 1, RESOURCE)
            print(f"node 1: PR on {RESOURCE} waiting behind node {victim}")
            print(f"kill -9 node {victim} (pid {cluster.procs[victim].pid}) while it holds EX",
                  flush=True)
            cluster.kill(victim)
        thread.join(timeout=WAIT_SECONDS + 20)
        if not check_granted(result):
            return 1
        show_status(cluster, 1)
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nodes", type=int, default=3, help="lockd processes (at least 3)")
    p.add_argument("--kill", type=int, default=3,
                   help="node id to kill -9 (2..NODES; node 1 is the waiter)")
    args = p.parse_args()
    if args.nodes < 3:
        # two survivors of three keep quorum; one survivor of two would not
        p.error(f"--nodes {args.nodes}: need at least 3 (the survivors must keep quorum)")
    if not 2 <= args.kill <= args.nodes:
        p.error(f"--kill {args.kill}: must name a node in 2..{args.nodes} "
                f"(node 1 is the waiter; killing it leaves nobody to be granted)")
    return demo(args.nodes, args.kill)


if __name__ == "__main__":
    sys.exit(main())
