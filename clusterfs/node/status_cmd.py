"""`clusterfs status`: members, generation, quorum and lock counts of one lockd.

Asks a running `clusterfs lockd` over its control socket: --control PATH, or
the default socket of --node-id N (the config names the cluster's nodes).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from clusterfs.errors import ConfigError
from clusterfs.node.lockd_cmd import ControlClient, default_control_path
from clusterfs.node.stallwatch import REPORT_AFTER

EXIT_USAGE = 2           # bad arguments or config: nothing was asked
EXIT_UNREACHABLE = 1     # lockd not reachable, or it answered with an error


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="cluster configuration (to check the node id)")
    p.add_argument("--node-id", type=int, help="ask this node's lockd (default socket)")
    p.add_argument("--control", help="control socket of the lockd to ask")
    p.add_argument("--json", action="store_true", help="print the raw answer")
    p.add_argument("--tasks", action="store_true",
                   help="also every task of the node and where it waits (a hang)")


def control_path(args: argparse.Namespace) -> str:
    """The control socket to ask; ConfigError (naming the field) if the arguments or
    the config file cannot say: unreadable file, bad TOML, node id not configured."""
    if args.control:
        return args.control
    if args.node_id is None:
        raise ConfigError("--node-id: give --control PATH or --node-id N")
    if args.config:
        from clusterfs.config import load_config

        load_config(args.config).node(args.node_id)
    return default_control_path(args.node_id)


def ask(command: str, args: argparse.Namespace, op: str, **kw: Any) -> tuple[int, dict[str, Any]]:
    """(0, reply) if lockd answered ok; else (exit status, {}) after one line on stderr."""
    try:
        path = control_path(args)
    except ConfigError as exc:
        print(f"clusterfs {command}: {exc}", file=sys.stderr)
        return EXIT_USAGE, {}
    try:
        with ControlClient(path, timeout=10) as c:
            reply = c.call(op, **kw)
    except (OSError, ValueError) as exc:   # ValueError: an answer that is not JSON
        print(f"clusterfs {command}: cannot reach lockd at {path}: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE, {}
    if not reply.get("ok"):
        print(f"clusterfs {command}: lockd answered {reply.get('error')}: "
              f"{reply.get('message')}", file=sys.stderr)
        return EXIT_UNREACHABLE, {}
    return 0, reply


def run(args: argparse.Namespace) -> int:
    code, st = ask("status", args, "status")
    if code:
        return code
    if getattr(args, "tasks", False):
        code, reply = ask("status", args, "tasks")
        if code:
            return code
        st["tasks"] = reply["tasks"]
    if args.json:
        print(json.dumps(st, indent=2))
        return 0
    print_status(st)
    for task in st.get("tasks", ()):
        print(f"task {task['name']}")
        for frame in task["frames"]:
            print(f"    {frame}")
    return 0


def print_status(st: dict[str, Any]) -> None:
    ls = st["lockspace"]
    print(f"node        {st['node']}")
    print(f"members     {' '.join(str(m) for m in st['members'])}")
    print(f"generation  {st['generation']}")
    print(f"quorum      {'yes' if st['quorate'] else 'NO (lock requests wait)'}")
    print(f"locking     {'running' if st['running'] else 'stopped (recovery)'}"
          f"  recoveries={ls['recoveries']}")
    print(f"locks       owned={ls['owned_locks']} granted={ls['owned_granted']} "
          f"waiting={ls['owned_waiting']}")
    print(f"master of   {ls['mastered_resources']} resources ({ls.get('idle_resources', 0)} "
          f"idle, {ls.get('removed', 0)} removed so far), {ls['master_locks']} locks; "
          f"directory entries {ls['directory_entries']}")
    print(f"traffic     requests={ls['requests']} remote={ls['remote_requests']} "
          f"remote lookups={ls.get('remote_lookups', 0)} "
          f"grants={ls['grants']} basts={ls['basts']} "
          f"overdue={ls.get('overdue', 0)} suspected={ls.get('suspected', 0)}")
    d = st.get("detection")
    if d:
        print(f"probes      sent={d['probes']} answered={d['answered']} "
              f"unanswered={d['unanswered']} stalled-not-dead={d['spared']}; beacons "
              f"sent={d['beacons_sent']} received={d['beacons_received']} "
              f"rejected={d['beacons_rejected']}")
    if "mount" in st:
        m = st["mount"]
        print(f"mount       {m['mountpoint']} on {m['device']}, journal slot {m['slot']}"
              f"{', withdrawn: ' + m['withdrawn'] if m.get('withdrawn') else ''}")
        slots = st.get("slots")
        if slots:
            print("slots       " + ", ".join(
                f"{s['slot']}: " + (f"node {s['holder']}" if isinstance(s["holder"], int)
                                    else "free" if s["holder"] is None else "unknown")
                for s in slots))
        rec = m.get("last_recovery")
        if rec:
            print(f"recovery    gen {rec['generation']}: departed {rec['departed']}, "
                  f"replayed {rec['replayed'] or 'nothing'}; DLM wait {rec['dlm_wait_s']} s, "
                  f"replay {rec['replay_s']} s, total {rec['total_s']} s")
        if not m.get("locks_usable", True):
            print("locks       waiting (view change, no quorum or journal recovery)")
        g = m["glock_stats"]
        print(f"glocks      cached={g['cached']} acquired={g['acquired']} "
              f"hits={g['cached_hits']} released={g['demoted']} "
              f"down-converted={g['down_converted']} (idle: "
              f"{g.get('shared_when_idle', 0)}) deadlocks-retried="
              f"{g['deadlocks_retried']}")
        j = m.get("journal_stats")
        if j:
            print(f"journal     commits={j['commits']} blocks={j['blocks']} "
                  f"checkpoints={j['checkpoints']} write-backs={j['write_backs']} "
                  f"(blocks revoked={j['revoked']}) flushes={j['flushes']}")
        dev = st.get("device") or {}
        if "ring_flushes" in dev:
            print(f"device      reads={dev['reads']} writes={dev['writes']} "
                  f"io_uring flushes={dev['ring_flushes']} "
                  f"reads={dev.get('ring_reads', 0)} "
                  f"(answered at submission={dev.get('ring_reads_at_once', 0)})")
        c = st.get("collector")
        if c:
            print(f"collector   full collections={c['full_collections']} freed={c['freed']} "
                  f"longest pause={c['longest_ms']} ms last={c['last_ms']} ms"
                  + (f" in cycles by generation={c['in_cycles_by_generation']}"
                     if "in_cycles_by_generation" in c else ""))
        stalls = st.get("stalls")
        if stalls:
            print(f"loop stalls {stalls['stalls']} of {REPORT_AFTER} s or more, "
                  f"longest {stalls['longest']} s"
                  + (f"; last logged: {stalls['last_cpu']}" if stalls.get("last_cpu") else ""))
        min_hold = m.get("min_hold", 0)
        for gl in m["glocks"]:
            name = ":".join(str(p) for p in gl["name"])
            extra = f" demote->{gl['demote_to']}" if gl["demote_to"] else ""
            if gl.get("requesting"):
                extra += f" requesting {gl['requesting']}"
            if gl.get("hold_time") and gl["hold_time"] > min_hold:
                extra += f" hold {gl['hold_time']} s"     # grown: two nodes both use it
            print(f"  {name:<24} {gl['mode'] or '-':<3} holders={gl['holders']} "
                  f"held {gl['held_for']} s{extra}")
