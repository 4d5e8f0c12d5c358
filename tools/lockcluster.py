#!/usr/bin/env python3
"""A local lock-service cluster, driven the way a user would: the demo's second half.

Starts N `clusterfs lockd` processes on 127.0.0.1 (temporary config and key),
shows `clusterfs status`, lets the last node take an EX lock and write its
value block while node 1 waits for PR on the same resource, kills the holder
with kill -9, and shows node 1 granted after recovery with the value block
marked invalid (a dead writer may have changed what it protected), the view's
generation grown and the dead node gone. Everything started here is stopped
on exit, also on failure.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import threading
import time

from clusterfs.node.lockbench_cmd import LocalLockCluster
from clusterfs.node.lockd_cmd import ControlClient


def show_status(cluster: LocalLockCluster, node_id: int) -> None:
    print(f"$ clusterfs status --control {cluster.control(node_id)}", flush=True)
    subprocess.run([sys.executable, "-m", "clusterfs.cli", "status",
                    "--control", cluster.control(node_id)], check=True)


def show_locks(cluster: LocalLockCluster, node_id: int, name: str) -> None:
    print(f"$ clusterfs locks --control {cluster.control(node_id)} {name}", flush=True)
    subprocess.run([sys.executable, "-m", "clusterfs.cli", "locks",
                    "--control", cluster.control(node_id), name], check=True)


def demo(nodes: int, victim: int) -> int:
    resource = "inode:42"
    with LocalLockCluster(list(range(1, nodes + 1))) as cluster:
        cluster.start_all()
        show_status(cluster, 1)

        holder = ControlClient(cluster.control(victim)).__enter__()
        granted = holder.call("lock", name=resource, mode="EX")
        print(f"node {victim}: EX on {resource} granted (a writer: it may change the value block)")

        result: dict[str, object] = {}

        def waiter() -> None:
            with ControlClient(cluster.control(1)) as c:
                result.update(c.call("lock", name=resource, mode="PR", timeout=30))

        thread = threading.Thread(target=waiter, daemon=True)
        thread.start()
        time.sleep(0.5)
        show_locks(cluster, 1, resource)
        print(f"node 1: PR on {resource} waiting behind node {victim}")

        print(f"kill -9 node {victim} (pid {cluster.procs[victim].pid}) while it holds EX",
              flush=True)
        cluster.kill(victim)
        thread.join(timeout=30)
        if not result.get("ok"):
            print(f"node 1 never got its lock: {result}", file=sys.stderr)
            return 1
        print(f"node 1: PR granted after recovery; lvb_valid={result['lvb_valid']} "
              f"(the dead EX holder may have changed it)")
        show_status(cluster, 1)
        del granted
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nodes", type=int, default=3)
    p.add_argument("--kill", type=int, default=3, help="node id to kill -9")
    args = p.parse_args()
    return demo(args.nodes, args.kill)


if __name__ == "__main__":
    sys.exit(main())
