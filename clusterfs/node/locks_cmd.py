"""`clusterfs locks RESOURCE`: a resource's grant, convert and wait queues.

RESOURCE is written as the DLM names it, parts joined by ':' (inode:17,
data:5, journal:0). Any lockd can be asked; it asks the resource's master.
"""

from __future__ import annotations

import argparse
import json
import sys

from clusterfs.node.lockd_cmd import ControlClient
from clusterfs.node.status_cmd import control_path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("resource", help="resource name, e.g. inode:17")
    p.add_argument("--config", help="cluster configuration (to check the node id)")
    p.add_argument("--node-id", type=int, help="ask this node's lockd (default socket)")
    p.add_argument("--control", help="control socket of the lockd to ask")
    p.add_argument("--json", action="store_true", help="print the raw answer")


def _range(r: list[int]) -> str:
    return "all" if r == [0, 2**64 - 1] else f"{r[0]}-{r[1]}"


def run(args: argparse.Namespace) -> int:
    try:
        with ControlClient(control_path(args), timeout=10) as c:
            res = c.call("locks", name=args.resource)
    except OSError as exc:
        print(f"clusterfs locks: cannot reach lockd: {exc}", file=sys.stderr)
        return 1
    if not res.get("ok"):
        print(f"clusterfs locks: {res.get('message')}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    print(f"resource {res['resource']}  master {res['master']}")
    if res["master"] is None:
        print("  (no master: nobody has locked it)")
        return 0
    for queue in ("granted", "converting", "waiting"):
        rows = [lk for lk in res["locks"] if lk["queue"] == queue]
        print(f"  {queue}:")
        for lk in rows:
            modes = lk["grmode"] or "-"
            if lk["rqmode"]:
                modes += f" -> {lk['rqmode']}"
            print(f"    node {lk['node']:<4} lkid {lk['lkid']:#x}  {modes:<10} "
                  f"range {_range(lk['range'])}")
        if not rows:
            print("    (none)")
    return 0
