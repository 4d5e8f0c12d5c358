"""A node dies under load on a shared iSCSI LUN fenced by SCSI-3 reservations (issues 7
and 8 together): the configuration a cluster on a SAN runs.

tgtd serves one LUN on 127.0.0.1; three `clusterfs mount` processes share it through
libiscsi (no kernel initiator), `[fencing] agent = "scsi-pr"` (nothing kills anyone:
the survivors PREEMPT AND ABORT the dead node's keys). `tools/stress` runs on all three,
each in its own directory and all in one shared directory; one node is killed with
SIGKILL at a moment its journal holds committed transactions; then as in
tests/test_recovery_stress.py (`one_death`): the survivors' stress runs go on with no
failure, the dead node's journal is replayed once, every fsync'd file is intact, the
dead node rejoins and works, all nodes see the same tree. Here also: the dead node's
keys are preempted, the restarted node registers again, and fsck of the LUN is clean
after all unmount.

The soak (`-m slow`) runs CLUSTERFS_ISCSI_SOAK_SEEDS seeds from
CLUSTERFS_ISCSI_SOAK_FROM, the victim node 1 + seed % 3.
"""

from __future__ import annotations

import os

import iscsiutil
import mountutil
import pytest
from recoveryutil import StressRun, kill_all, stop_all
from test_fence_mount import registered_nodes, scsi_pr_cluster
from test_recovery_stress import one_death

pytestmark = pytest.mark.skipif(
    mountutil.missing_prerequisites() is not None or
    iscsiutil.missing_prerequisites() is not None,
    reason=str(mountutil.missing_prerequisites() or iscsiutil.missing_prerequisites()))

MIB = 1 << 20
SOAK_SEEDS = int(os.environ.get("CLUSTERFS_ISCSI_SOAK_SEEDS", "10"))
SOAK_FROM = int(os.environ.get("CLUSTERFS_ISCSI_SOAK_FROM", "9000"))


def death_on_a_lun_under_stress(tmp_path, seed: int, victim: int) -> None:
    survivors = [n for n in (1, 2, 3) if n != victim]
    with scsi_pr_cluster(tmp_path, 512 * MIB) as (c, observer, _t):

        def preempted() -> None:
            assert victim not in registered_nodes(observer)
            assert f"node {victim} fenced: key" in c.logs()

        def registered_again() -> None:
            assert registered_nodes(observer).count(victim) == 3

        runs: dict[int, StressRun] = {}
        try:
            with c.forced_down_on_error():
                c.start(1, 2, 3)
                runs.update({n: StressRun(n, c.mountpoint(n), seed + 10 * n,
                                          tmp_path).start() for n in c.node_ids})
                one_death(c, tmp_path, seed, victim, survivors, runs, shared=True,
                          after_recovery=preempted, after_rejoin=registered_again)
                for n in c.node_ids:
                    c.unmount(n)
        finally:
            stop_all(list(runs.values()))
            kill_all(list(runs.values()))


def test_a_node_killed_under_stress_on_a_lun_fenced_by_reservations(tmp_path):
    death_on_a_lun_under_stress(tmp_path, 11, victim=3)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(SOAK_FROM, SOAK_FROM + SOAK_SEEDS))
def test_soak_node_killed_under_stress_on_a_lun(tmp_path, seed):
    death_on_a_lun_under_stress(tmp_path, seed, victim=1 + seed % 3)
