#!/usr/bin/env python3
"""cachebench: what a node's lock cache costs as files pile up, with and without a bound.

For each setting (no bound reached: the default max_glocks; then each --bound) it brings
up a two-node dev cluster (tools/devcluster, --mount-options max_glocks=N), has node 1
create --files empty files in one directory, and after every --batch prints the create
rate of that batch, node 1's resident memory, the glocks it caches and how many it let
go so far; then a summary line per setting with the last batch's rate and memory as
ratios against the unbounded run. Everything it starts is stopped on exit.

    tools/cachebench.py [--files 30000] [--batch 5000] [--bound 5000 ...] [--dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
CHECKOUT = os.path.dirname(HERE)
if CHECKOUT not in sys.path:
    sys.path.insert(0, CHECKOUT)

from clusterfs.cache.glock import MAX_CACHED  # noqa: E402  (the mount's default bound)


def _devcluster(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, os.path.join(HERE, "devcluster"), *args],
                       capture_output=True, text=True, timeout=600)
    if check and r.returncode != 0:
        raise RuntimeError(f"devcluster {' '.join(args)}: {r.stderr.strip()}")
    return r


def _node_status(directory: str) -> dict:
    r = subprocess.run([sys.executable, "-m", "clusterfs.cli", "status", "--control",
                        os.path.join(directory, "control", "node1.sock"), "--json"],
                       capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, PYTHONPATH=CHECKOUT))
    if r.returncode != 0:
        raise RuntimeError(f"clusterfs status: {r.stderr.strip()}")
    return json.loads(r.stdout)["mount"]


def _rss_mib(directory: str) -> int:
    with open(os.path.join(directory, "devcluster.json")) as f:
        pid = json.load(f)["nodes"]["1"]["pid"]
    with open(f"/proc/{pid}/status") as f:
        line = next(x for x in f if x.startswith("VmRSS"))
    return int(line.split()[1]) // 1024


def run_setting(base: str, bound: int, files: int, batch: int) -> tuple[float, int]:
    """(last batch's creates/s, last RSS MiB) for one bound."""
    directory = os.path.join(base, f"bound{bound}")
    _devcluster("up", "--nodes", "2", "--dir", directory, "--size", "4G",
                "--mount-options", f"max_glocks={bound}")
    try:
        target = os.path.join(directory, "node1", "many")
        os.mkdir(target)
        rate = rss = 0
        for first in range(0, files, batch):
            t0 = time.monotonic()
            for i in range(first, min(files, first + batch)):
                os.close(os.open(os.path.join(target, f"f{i:07d}"),
                                 os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
            rate = (min(files, first + batch) - first) / (time.monotonic() - t0)
            stats = _node_status(directory)["glock_stats"]
            rss = _rss_mib(directory)
            print(f"  max_glocks {bound:6d}: {first + batch:7d} files  {rate:6.0f} creates/s"
                  f"  RSS {rss:5d} MiB  glocks {stats['cached']:6d}  let go "
                  f"{stats.get('evicted', 0)}", flush=True)
        return rate, rss
    finally:
        _devcluster("down", "--dir", directory, check=False)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--files", type=int, default=30_000)
    p.add_argument("--batch", type=int, default=5_000)
    p.add_argument("--bound", type=int, action="append", default=[],
                   help="a max_glocks to measure (repeatable; default 5000)")
    p.add_argument("--dir", help="where the dev clusters go (default: a temporary dir)")
    args = p.parse_args(argv)
    if args.files < 1 or args.batch < 1:
        p.error("--files and --batch must be positive")
    bounds = args.bound or [5_000]
    base = args.dir or tempfile.mkdtemp(prefix="cachebench-")
    made = args.dir is None
    try:
        results = {b: run_setting(base, b, args.files, args.batch)
                   for b in [max(MAX_CACHED, args.files + 100), *bounds]}
    except (RuntimeError, OSError) as exc:
        print(f"cachebench: {exc}", file=sys.stderr)
        return 1
    finally:
        if made:
            shutil.rmtree(base, ignore_errors=True)
    unbounded = next(iter(results.values()))
    print("summary (last batch; ratio against no bound reached):")
    for bound, (rate, rss) in results.items():
        print(f"  max_glocks {bound:6d}: {rate:6.0f} creates/s ({rate / unbounded[0]:.2f})"
              f"  RSS {rss} MiB ({rss / unbounded[1]:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
