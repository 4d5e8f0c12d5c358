"""The cluster stack of one node: TCP endpoint + membership (+ fencing hook).

This is the handover point to the layers above (lockd, mount). Its signature is
stable:

    async with open_cluster_node(config, node_id, *, fence_agent=None) as node:
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

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import trio

from clusterfs.comms.tcp import TcpEndpoint
from clusterfs.config import ClusterConfig, load_config
from clusterfs.fence.agent import FenceAgent, NoopAgent
from clusterfs.membership.service import MembershipService


@dataclass
class ClusterNode:
    config: ClusterConfig
    node_id: int
    endpoint: TcpEndpoint
    membership: MembershipService
    fence_agent: FenceAgent
    nursery: trio.Nursery

    def statistics(self) -> dict[str, Any]:
        return {"node_id": self.node_id, "comms": self.endpoint.statistics(),
                "membership": self.membership.statistics()}


@asynccontextmanager
async def open_cluster_node(config: ClusterConfig | str | os.PathLike[str], node_id: int, *,
                            fence_agent: FenceAgent | None = None,
                            incarnation: int | None = None) -> AsyncIterator[ClusterNode]:
    cfg = config if isinstance(config, ClusterConfig) else load_config(config)
    cfg.node(node_id)   # ConfigError if not configured
    agent: FenceAgent = fence_agent if fence_agent is not None else NoopAgent()
    endpoint = TcpEndpoint(cfg, node_id)
    membership = MembershipService(endpoint, cfg.node_ids,
                                   heartbeat_interval=cfg.heartbeat_interval,
                                   failure_timeout=cfg.failure_timeout,
                                   fence_agent=agent, incarnation=incarnation)
    async with trio.open_nursery() as nursery:
        await nursery.start(endpoint.serve)
        await nursery.start(membership.run)
        try:
            yield ClusterNode(cfg, node_id, endpoint, membership, agent, nursery)
        finally:
            nursery.cancel_scope.cancel()
