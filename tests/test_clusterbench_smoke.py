"""Smoke test of tools/clusterbench.py: the smallest sizes, clusterfs only (a 3-node
cluster and a one-node mount). It measures nothing and asserts no timings: only that
the command runs, prints the table with numbers and leaves nothing behind."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import mountutil

BENCH = Path(__file__).resolve().parent.parent / "tools" / "clusterbench.py"
WORKLOADS = ("create-shared", "create-private", "create", "stat-local", "stat-remote",
             "write-shared-1m", "write-1m", "write-shared-64k", "write-64k", "seq-write",
             "overwrite-shared-64k", "overwrite-64k", "seq-read", "rand-fsync",
             "rand-fdatasync")


def test_clusterbench_runs_on_clusterfs(tmp_path):
    mountutil.require_mounts("clusterfs")
    r = subprocess.run([sys.executable, str(BENCH), "--quick", "--files", "60",
                        "--size-mib", "4", "--rand-ops", "20", "--pause", "0",
                        "--only", "cluster",
                        "--only", "onenode", "--backing-dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    for name in WORKLOADS:
        m = re.search(rf"^{re.escape(name)}\s+\S+/s\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)",
                      r.stdout, re.MULTILINE)
        assert m, f"no {name!r} row in:\n{r.stdout}"
        cluster, onenode, ext4, gluster, ratio = m.groups()
        assert float(cluster) > 0 and float(onenode) > 0, m.group(0)
        assert float(ratio) >= 0, m.group(0)   # cluster / onenode
        assert (ext4, gluster) == ("-", "-"), m.group(0)     # not run
    assert "60 files per create/stat step" in r.stdout
    assert f"backing files in {tmp_path}" in r.stdout
    assert re.search(r"^aim 1, .*: (MET|NOT MET)", r.stdout, re.MULTILINE), r.stdout
    assert not list(tmp_path.iterdir()), "clusterbench left files behind"
    assert not mountutil._is_mounted(str(tmp_path))
