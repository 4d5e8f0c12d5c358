"""Membership over the real TCP transport, several nodes in one trio run,
through the handover API open_cluster_node."""

from __future__ import annotations

import trio
from trioutil import wait_until

from clusterfs.comms.localcluster import local_config
from clusterfs.fence.agent import NoopAgent
from clusterfs.membership.view import Fenced, ViewChange
from clusterfs.node.cluster import open_cluster_node

INTERVAL, TIMEOUT = 0.1, 0.6


def test_open_cluster_node_forms_view_and_survives_a_crash():
    async def main():
        cfg = local_config([1, 2, 3], heartbeat_interval=INTERVAL, failure_timeout=TIMEOUT)
        agent = NoopAgent()
        async with (open_cluster_node(cfg, 1, fence_agent=agent) as a,
                    open_cluster_node(cfg, 2) as b):
            assert (a.node_id, a.config, a.endpoint.node_id) == (1, cfg, 1)
            async with open_cluster_node(cfg, 3) as c:
                nodes = (a, b, c)
                await wait_until(lambda: all(n.membership.view.members == {1, 2, 3}
                                             for n in nodes), 10)
                assert len({n.membership.view.generation for n in nodes}) == 1
                v = await a.membership.wait_quorum()
                # the endpoint stamps the view generation on every frame
                assert all(n.endpoint.generation == v.generation for n in nodes)
                assert a.statistics()["membership"].members == [1, 2, 3]
            t0 = trio.current_time()
            await wait_until(lambda: all(n.membership.view.members == {1, 2}
                                         for n in (a, b)), TIMEOUT + 5)
            assert trio.current_time() - t0 <= TIMEOUT + 2.0
            await wait_until(lambda: isinstance(b.membership.events[-1], Fenced), 5)
            assert a.membership.events == b.membership.events
            vc = a.membership.events[-2]
            assert isinstance(vc, ViewChange) and vc.left == {3}
            assert agent.calls == [(3, vc.view.generation)]

    trio.run(main)
