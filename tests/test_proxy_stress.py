"""A block server dies under load while a node without a disk path works through it
(issues 7 and 8 together), as in tests/test_recovery_stress.py (`one_death`).

Nodes 1 and 2 reach the loop device and serve it; node 3 mounts through them
(proxyutil.ProxyCluster). `tools/stress` runs on all three at once, each in its own
directory and (all three) in one shared directory. One server is killed with SIGKILL
at a moment its journal holds committed transactions (recoveryutil). What must hold:

* node 3's stress run and the other server's go on with no failure: node 3's I/O
  that went to the dead server is re-targeted, and its locks wait out the recovery;
* the dead node's journal is replayed once; every file it fsync'd is intact, read
  through a survivor and through the dead node once restarted (which then works);
* every file a survivor fsync'd is intact, read through the restarted node;
* every node sees the same tree, and fsck is clean after all unmount.

The soak (`-m slow`, CLUSTERFS_PROXY_SOAK_SEEDS seeds from CLUSTERFS_PROXY_SOAK_FROM)
runs more seeds, the victim node 1 + seed % 3: a server or the proxy itself.
"""

from __future__ import annotations

import os

import mountutil
import pytest
from proxyutil import ProxyCluster, status
from recoveryutil import StressRun, kill_all, stop_all
from test_recovery_stress import one_death

pytestmark = pytest.mark.skipif(mountutil.missing_prerequisites() is not None,
                                reason=str(mountutil.missing_prerequisites()))

SOAK_SEEDS = int(os.environ.get("CLUSTERFS_PROXY_SOAK_SEEDS", "10"))
SOAK_FROM = int(os.environ.get("CLUSTERFS_PROXY_SOAK_FROM", "8000"))


def death_under_proxy_stress(tmp_path, seed: int, victim: int) -> None:
    survivors = [n for n in (1, 2, 3) if n != victim]

    def retargeted() -> None:
        if victim != 3:
            dev = status(c, 3)["device"]
            print(f"node 3's device after the death: retargets {dev['retargets']}, "
                  f"timeouts {dev['timeouts']}")

    with ProxyCluster(tmp_path) as c:
        runs = {n: StressRun(n, c.mountpoint(n), seed + 10 * n, tmp_path).start()
                for n in c.node_ids}
        try:
            one_death(c, tmp_path, seed, victim, survivors, runs, shared=True,
                      after_recovery=retargeted)
        finally:
            stop_all(list(runs.values()))
            kill_all(list(runs.values()))


def test_a_server_killed_under_stress_while_a_proxy_works_through_it(tmp_path):
    death_under_proxy_stress(tmp_path, 7, victim=2)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(SOAK_FROM, SOAK_FROM + SOAK_SEEDS))
def test_soak_node_killed_under_proxy_stress(tmp_path, seed):
    """Servers and the proxy in turn: the victim is node 1 + seed % 3."""
    death_under_proxy_stress(tmp_path, seed, victim=1 + seed % 3)
