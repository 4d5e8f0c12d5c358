"""The cluster stack of one node: TCP endpoint + membership (+ fencing hook).

This is the handover point to the layers above (lockd, mount). Its signature is
stable:

    async with open_cluster_node(config, node_id, *, fence_agent=None, incarnation=None,
                                 generation_record=None) as node:
        node.endpoint     # clusterfs.comms.tcp.TcpEndpoint (the Endpoint contract)
        node.membership   # clusterfs.membership.service.MembershipService (Membership)
        node.config       # clusterfs.config.ClusterConfig
        node.node_id      # int
        node.nursery      # a nursery living as long as the node, for the caller's tasks
        await node.membership.wait_quorum()

`config` may be a ClusterConfig or a path to the TOML file. Leaving the block
cancels everything (the node simply vanishes from the others' view, as a crash
would; they fence it).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import trio

from clusterfs.comms.beacon import BeaconService
from clusterfs.comms.tcp import TcpEndpoint
from clusterfs.config import ClusterConfig, load_config
from clusterfs.fence.agent import FenceAgent, NoopAgent
from clusterfs.membership.generation_record import GenerationRecord
from clusterfs.membership.service import MembershipService, new_incarnation


@dataclass
class ClusterNode:
    config: ClusterConfig
    node_id: int
    endpoint: TcpEndpoint
    membership: MembershipService
    fence_agent: FenceAgent
    nursery: trio.Nursery
    beacon: BeaconService

    def statistics(self) -> dict[str, Any]:
        return {"node_id": self.node_id, "comms": self.endpoint.statistics(),
                "membership": self.membership.statistics(),
                "beacon": self.beacon.statistics()}

    def detection(self) -> dict[str, int]:
        """How probes of silent nodes ended, and the beacons behind them."""
        m, b = self.membership, self.beacon
        return {"probes": m.probes, "answered": m.probes_answered,
                "unanswered": m.probes_unanswered, "spared": m.probes_spared,
                "beacons_sent": b.sent, "beacons_received": b.received,
                "beacons_rejected": b.rejected}


@asynccontextmanager
async def open_cluster_node(config: ClusterConfig | str | os.PathLike[str], node_id: int, *,
                            fence_agent: FenceAgent | None = None,
                            incarnation: int | None = None,
                            generation_record: GenerationRecord | None = None,
                            disk: Any = None, endpoint: TcpEndpoint | None = None
                            ) -> AsyncIterator[ClusterNode]:
    """`disk`: a DiskHeartbeat (node/diskbeat.py) when this node has the shared device:
    membership's second path, run here from before the first view. `endpoint`: one
    made (and listening) already, e.g. by a mount that binds before it does anything
    else."""
    cfg = config if isinstance(config, ClusterConfig) else load_config(config)
    cfg.node(node_id)   # ConfigError if not configured
    agent: FenceAgent = fence_agent if fence_agent is not None else NoopAgent()
    if endpoint is None:
        endpoint = TcpEndpoint(cfg, node_id)
    membership = MembershipService(endpoint, cfg.node_ids,
                                   heartbeat_interval=cfg.heartbeat_interval,
                                   failure_timeout=cfg.failure_timeout,
                                   fence_agent=agent, incarnation=incarnation,
                                   generation_record=generation_record, disk=disk,
                                   probe_timeout=cfg.probe_timeout)
    # a thread apart from the event loop says this process runs (comms/beacon.py)
    beacon = BeaconService(cfg, node_id, membership.incarnation, cfg.heartbeat_interval / 2)
    membership.liveness = beacon
    await endpoint.listen()     # first: a node already running here is refused at once
    try:
        async with trio.open_nursery() as nursery:
            if disk is not None:
                disk.attach(membership)
                await nursery.start(disk.run)
            if os.environ.get(STALL_ENV):
                nursery.start_soon(_stall_on_signal, float(os.environ[STALL_ENV]))
            await nursery.start(beacon.run)
            await nursery.start(endpoint.serve)
            await nursery.start(membership.run)
            try:
                yield ClusterNode(cfg, node_id, endpoint, membership, agent, nursery, beacon)
            finally:
                nursery.cancel_scope.cancel()
    finally:
        endpoint.close_listeners()


# A test's way to stall a node's event loop while its process (and its beacon thread)
# runs on, as a long collection or a CPU shortage does: with this set to a number of
# seconds, SIGUSR2 makes the loop sleep that long. Unset (always, outside tests),
# SIGUSR2 is left alone.
STALL_ENV = "CLUSTERFS_TEST_STALL_ON_SIGUSR2"


async def _stall_on_signal(seconds: float) -> None:
    import signal
    import threading
    import time

    if threading.current_thread() is not threading.main_thread():
        return                    # signals reach the main thread only
    with trio.open_signal_receiver(signal.SIGUSR2) as signals:
        async for _ in signals:
            logging.getLogger("clusterfs.node").warning(
                "stalling the event loop %.2f s (SIGUSR2 with %s set: a test)", seconds,
                STALL_ENV)
            time.sleep(seconds)


# -- `python -m clusterfs.node.cluster --config FILE --node-id N`: a bare cluster node ----
# Runs comms + membership only and prints one JSON line per membership event on
# stdout (used by the multi-process tests and for drills).

def _event_json(ev: object) -> str:
    import json

    from clusterfs.membership.view import ExpelledEvent, Fenced, ViewChange

    if isinstance(ev, ViewChange):
        d: dict[str, Any] = {"event": "view", "gen": ev.view.generation,
                             "members": sorted(ev.view.members), "quorate": ev.view.quorate,
                             "joined": sorted(ev.joined), "left": sorted(ev.left)}
    elif isinstance(ev, Fenced):
        d = {"event": "fenced", "gen": ev.generation, "nodes": sorted(ev.nodes)}
    elif isinstance(ev, ExpelledEvent):
        d = {"event": "expelled", "gen": ev.generation}
    else:  # pragma: no cover
        d = {"event": repr(ev)}
    return json.dumps(d)


async def _serve_main(config: str, node_id: int, pid_dir: str | None,
                      record: GenerationRecord | None, incarnation: int) -> None:
    from clusterfs.fence.agent import ProcessAgent

    agent = ProcessAgent(pid_dir=pid_dir) if pid_dir else None
    async with open_cluster_node(config, node_id, fence_agent=agent, incarnation=incarnation,
                                 generation_record=record) as node:
        print(f'{{"event": "started", "node": {node_id}, "pid": {os.getpid()}}}', flush=True)
        async for ev in node.membership.subscribe():
            print(_event_json(ev), flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m clusterfs.node.cluster")
    p.add_argument("--config", required=True)
    p.add_argument("--node-id", type=int, required=True)
    p.add_argument("--fence-pid-dir", metavar="DIR",
                   help="record this process in DIR/node<ID>.pid; fence others by SIGKILL "
                   "of the process their file names")
    p.add_argument("--state-dir", metavar="DIR",
                   help="keep the highest generation promised in DIR/node<ID>.generation "
                   "(without it, generations start again from 1 after a restart)")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format=f"%(asctime)s node{args.node_id} %(name)s: %(message)s")
    incarnation = new_incarnation()   # recorded, so a fence of an earlier life spares us
    if args.fence_pid_dir:   # before joining: whoever may count on us can also fence us
        from clusterfs.errors import FenceError
        from clusterfs.fence.pidfile import write_pid_file

        try:
            write_pid_file(args.fence_pid_dir, args.node_id, incarnation)
        except (FenceError, OSError) as exc:   # another live node N, or an unusable DIR
            print(f"--fence-pid-dir: {exc}", file=sys.stderr)
            return 2
    # the record outlives us, clean exit or not: it is how the others prove us gone
    record = None
    if args.state_dir:
        from clusterfs.errors import StateError
        from clusterfs.membership.generation_record import GenerationFile

        try:
            record = GenerationFile(args.state_dir, args.node_id)
        except StateError as exc:
            print(f"--state-dir: {exc}", file=sys.stderr)
            return 2
    return _run_node(args, record, incarnation)


def _run_node(args: argparse.Namespace, record: GenerationRecord | None,
              incarnation: int) -> int:
    """Run until interrupted; the exit status. trio >= 0.25 groups errors leaving a
    nursery, hence except*."""
    from clusterfs.errors import ConfigError, ListenError, first_in_group

    code = 0
    try:
        trio.run(_serve_main, args.config, args.node_id, args.fence_pid_dir, record,
                 incarnation)
    except* ConfigError as group:
        print(f"config error: {first_in_group(group, ConfigError)}", file=sys.stderr)
        code = 2
    except* ListenError as group:
        print(first_in_group(group, ListenError), file=sys.stderr)
        code = 1
    except* KeyboardInterrupt:
        code = 130
    return code


if __name__ == "__main__":
    raise SystemExit(main())
