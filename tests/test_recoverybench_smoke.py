"""tools/recoverybench.py runs (one kill): it starts a dev cluster under load, kills a
node, times the survivors' recovery from their logs, restarts the node, and ends with
clean stress runs and a clean fsck. Figures are not checked here (docs/benchmarks.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import mountutil
import pytest

TOOLS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools")

pytestmark = pytest.mark.skipif(mountutil.missing_prerequisites() is not None,
                                reason=str(mountutil.missing_prerequisites()))


def test_recoverybench_one_kill(tmp_path):
    d = tmp_path / "dc"
    out = tmp_path / "figures.json"
    try:
        r = subprocess.run([sys.executable, os.path.join(TOOLS, "recoverybench.py"),
                            "--kills", "1", "--settle", "1", "--dir", str(d),
                            "--json", str(out)],
                           capture_output=True, text=True, timeout=600)
    finally:
        if (d / "devcluster.json").exists():     # the bench died before its own teardown
            subprocess.run([sys.executable, os.path.join(TOOLS, "devcluster"), "down",
                            "--dir", str(d)], capture_output=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SERVING AGAIN" in r.stdout and "stress runs clean, fsck clean" in r.stdout, r.stdout
    kills = json.loads(out.read_text())["kills"]
    assert len(kills) == 1
    steps = kills[0]["steps"]
    # in the failure path's order (each survivor logs its steps in that order)
    assert steps["detected"] <= steps["fenced"] <= steps["dlm_done"] <= steps["replay_done"]
