"""A block server dies under load while a node without a disk path works through it
(issues 7 and 8 together).

Nodes 1 and 2 reach the loop device and serve it; node 3 mounts through them
(proxyutil.ProxyCluster). `tools/stress` runs on all three at once, each in its own
directory and (all three) in one shared directory. One server is killed with SIGKILL
at a moment its journal holds committed transactions (recoveryutil). What must hold:

* node 3's stress run and the other server's go on with no failure: node 3's I/O
  that went to the dead server is re-targeted, and its locks wait out the recovery;
* the dead server's journal is replayed once; every file it fsync'd is intact, read
  through a survivor and through the dead server once restarted;
* every file a survivor fsync'd is intact, read through each other node;
* every node sees the same tree, and fsck is clean after all unmount.

The soak (`-m slow`, CLUSTERFS_PROXY_SOAK_SEEDS seeds from CLUSTERFS_PROXY_SOAK_FROM)
runs more seeds, the victim node 1 + seed % 3: a server or the proxy itself.
"""

from __future__ import annotations

import os

import mountutil
import pytest
from proxyutil import ProxyCluster, status
from recoveryutil import (
    StressRun,
    assert_same_tree,
    kill_all,
    kill_with_dirty_journals,
    log_size,
    stop_all,
    verify_intact,
)
from test_recovery_stress import (
    MIN_CLEAN,
    MIN_FSYNCS,
    MORE_FSYNCS,
    assert_replayed_once,
    report_recovery,
    wait_fsyncs,
    wait_recovered,
)

pytestmark = pytest.mark.skipif(mountutil.missing_prerequisites() is not None,
                                reason=str(mountutil.missing_prerequisites()))

SOAK_SEEDS = int(os.environ.get("CLUSTERFS_PROXY_SOAK_SEEDS", "10"))
SOAK_FROM = int(os.environ.get("CLUSTERFS_PROXY_SOAK_FROM", "8000"))


def death_under_proxy_stress(tmp_path, seed: int, victim: int) -> None:
    survivors = [n for n in (1, 2, 3) if n != victim]
    with ProxyCluster(tmp_path) as c:
        runs = {n: StressRun(n, c.mountpoint(n), seed + 10 * n, tmp_path).start()
                for n in c.node_ids}
        try:
            wait_fsyncs(list(runs.values()), MIN_FSYNCS)
            offsets = {n: log_size(c, n) for n in survivors}
            dirty = kill_with_dirty_journals(
                c, [victim], also=lambda: runs[victim].clean_fsynced() >= MIN_CLEAN,
                first=lambda: kill_all([runs[victim]]))
            report_recovery(wait_recovered(c, survivors, offsets, {victim}))
            assert_replayed_once(c, dirty, offsets)
            checked = verify_intact(runs[victim], c.mountpoint(survivors[-1]))
            assert checked > 0, "the dead node's stress logged no fsync'd file still clean"
            wait_fsyncs([runs[n] for n in survivors], MORE_FSYNCS)   # both still serve
            if victim != 3:
                dev = status(c, 3)["device"]
                print(f"node 3's device after the death: retargets {dev['retargets']}, "
                      f"timeouts {dev['timeouts']}")
            c.start(victim)                                      # it rejoins
            assert verify_intact(runs[victim], c.mountpoint(victim)) == checked
            wait_fsyncs([runs[n] for n in survivors], MORE_FSYNCS)
            stop_all(list(runs.values()))
            for n in survivors:
                runs[n].finish()
            for n in survivors:
                for reader in c.node_ids:
                    if reader != n:
                        verify_intact(runs[n], c.mountpoint(reader))
            assert_same_tree(c, c.node_ids)
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
