"""Smoke test of tools/bench.py: tiny sizes, null filesystem only. (Named
test_posix_* only to sit in this suite's files; it measures nothing and
asserts no timings.)"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import mountutil

BENCH = Path(__file__).resolve().parent.parent / "tools" / "bench.py"


def test_bench_runs_on_nullfs(tmp_path):
    mountutil.require_mounts("null")
    r = subprocess.run([sys.executable, str(BENCH), "--size-mib", "4", "--files", "50",
                        "--only", "null", "--backing-dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = {}
    for label in ("sequential write MiB/s", "sequential read MiB/s", "empty-file creates/s"):
        m = re.search(re.escape(label) + r"\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)", r.stdout)
        assert m, f"no {label!r} row in:\n{r.stdout}"
        rows[label] = m.groups()
        cfs, ext4, null, *_ = m.groups()
        assert (cfs, ext4) == ("-", "-")          # not run
        assert float(null) > 0
    assert "50 empty-file creates" in r.stdout
    assert f"backing files in {tmp_path}" in r.stdout
    assert not list(tmp_path.iterdir()), "bench left files behind"
    assert not mountutil._is_mounted(str(tmp_path))
