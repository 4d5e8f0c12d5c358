"""`clusterfs status`: members, generation, quorum and lock counts of one lockd.

Asks a running `clusterfs lockd` over its control socket: --control PATH, or
the default socket of --node-id N (the config names the cluster's nodes).
"""

from __future__ import annotations

import argparse
import json
import sys

from clusterfs.node.lockd_cmd import ControlClient, default_control_path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="cluster configuration (to check the node id)")
    p.add_argument("--node-id", type=int, help="ask this node's lockd (default socket)")
    p.add_argument("--control", help="control socket of the lockd to ask")
    p.add_argument("--json", action="store_true", help="print the raw answer")


def control_path(args: argparse.Namespace) -> str:
    if args.control:
        return args.control
    if args.node_id is None:
        raise SystemExit("give --control PATH or --node-id N")
    if args.config:
        from clusterfs.config import load_config

        load_config(args.config).node(args.node_id)   # ConfigError if unknown
    return default_control_path(args.node_id)


def run(args: argparse.Namespace) -> int:
    try:
        with ControlClient(control_path(args), timeout=10) as c:
            st = c.call("status")
    except OSError as exc:
        print(f"clusterfs status: cannot reach lockd: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(st, indent=2))
        return 0
    ls = st["lockspace"]
    print(f"node        {st['node']}")
    print(f"members     {' '.join(str(m) for m in st['members'])}")
    print(f"generation  {st['generation']}")
    print(f"quorum      {'yes' if st['quorate'] else 'NO (lock requests wait)'}")
    print(f"locking     {'running' if st['running'] else 'stopped (recovery)'}"
          f"  recoveries={ls['recoveries']}")
    print(f"locks       owned={ls['owned_locks']} granted={ls['owned_granted']} "
          f"waiting={ls['owned_waiting']}")
    print(f"master of   {ls['mastered_resources']} resources, {ls['master_locks']} locks; "
          f"directory entries {ls['directory_entries']}")
    print(f"traffic     requests={ls['requests']} remote={ls['remote_requests']} "
          f"grants={ls['grants']} basts={ls['basts']}")
    return 0
