"""`clusterfs locks RESOURCE`: a resource's grant, convert and wait queues.

RESOURCE is written as the DLM names it, parts joined by ':' (inode:17,
data:5, journal:0). Any lockd can be asked; it asks the resource's master.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from clusterfs.node.status_cmd import ask


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("resource", help="resource name, e.g. inode:17")
    p.add_argument("--config", help="cluster configuration (to check the node id)")
    p.add_argument("--node-id", type=int, help="ask this node's lockd (default socket)")
    p.add_argument("--control", help="control socket of the lockd to ask")
    p.add_argument("--json", action="store_true", help="print the raw answer")


def _range(r: list[int]) -> str:
    return "all" if r == [0, 2**64 - 1] else f"{r[0]}-{r[1]}"


def run(args: argparse.Namespace) -> int:
    code, res = ask("locks", args, "locks", name=args.resource)
    if code:
        return code
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    print(f"resource {res['resource']}  master {res['master']}")
    if res["master"] is None:
        print("  (no master: nobody has locked it)")
        return 0
    for queue in ("granted", "converting", "waiting"):
        print_queue(queue, [lk for lk in res["locks"] if lk["queue"] == queue])
    return 0


def print_queue(queue: str, rows: list[dict[str, Any]]) -> None:
    print(f"  {queue}:")
    for lk in rows:
        modes = lk["grmode"] or "-"
        if lk["rqmode"]:
            modes += f" -> {lk['rqmode']}"
        print(f"    node {lk['node']:<4} lkid {lk['lkid']:#x}  {modes:<10} "
              f"range {_range(lk['range'])}")
    if not rows:
        print("    (none)")
