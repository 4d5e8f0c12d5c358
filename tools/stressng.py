#!/usr/bin/env python3
"""tools/stressng.py: standard stress tools on every node of a dev cluster at once.

What users do: one device, mounted on several nodes, stress-ng's filesystem stressors
and fio with data verification running on all of them at the same time. A soak, not a
test of the default run: it needs `apt-get install -y stress-ng fio`, takes minutes,
and says what it lacks when a tool is missing.

    tools/stressng.py --dir /tmp/sng [--nodes 3] [--seconds 10] [--stressors a,b]
                      [--instances 1] [--modes own,shared] [--no-fio] [--keep]

It brings a cluster up in DIR (tools/devcluster), then for each stressor and mode runs
`stress-ng --<name> 1 -t S --verify` on every node at once, each node in its own
directory (own) or all in one directory (shared); then fio: each node writes its
region of one shared file with crc32c headers and every other node verifies it
(--verify_only), and each node runs randwrite+verify jobs of several block sizes in
its own directory. A step fails on a nonzero exit, a verify error, or a node log line
saying a loop stalled past a second, a node was fenced or taken for dead, or the fs
withdrew. At the end it takes the cluster down with fsck (--keep leaves it up).
Exit status 0 only if every step passed and fsck is clean.

What is left out, by design (README "Failure behaviour" and "Several nodes on one
device"): stressors that need what FUSE or pyfuse3 does not offer (fallocate, which
pyfuse3 has no handler for, so EOPNOTSUPP; shared writable mmap, ENODEV on a
cluster mount); POSIX locks (flock, fcntl, lockf) run but stay node-local.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
DEVCLUSTER = os.path.join(HERE, "devcluster")
# The filesystem stressors that ran clean on a 3-node cluster once the write-behind
# read stall was fixed (2026-12-05); fpunch is the one that found it.
DEFAULT_STRESSORS = (
    "dir,dentry,rename,link,symlink,hdd,iomix,fpunch,fstat,getdent,chmod,chown,utime,"
    "xattr,seek,readahead,mknod,open,filename,access,chdir,copy-file,dirdeep,dirmany,"
    "fiemap,fsize,io,touch,file-ioctl,lockf,flock,fcntl,mmap,sync-file")
# Node log lines that fail a step: a stall the heartbeats notice, a node removed
LOG_FAILURES = re.compile(
    r"our loop stalled (?:[1-9]|\d{2,})\.\d+ s|fenced|taken for dead|withdr|Traceback"
    r"|ERROR|CRITICAL")
STEP_SLACK = 180.0        # seconds a step may run past its nominal time before it hangs


class Stop(Exception):
    """A node is gone: the steps left would only fail on its mount."""


@dataclass
class Step:
    name: str
    mode: str
    ok: bool
    detail: str


def devcluster(*args: str, timeout: float = 300.0) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, DEVCLUSTER, *args], capture_output=True,
                          text=True, timeout=timeout)


class Cluster:
    def __init__(self, directory: str, nodes: int) -> None:
        self.dir = directory
        self.nodes = nodes
        self._log_marks = [0] * nodes

    def mount(self, k: int) -> str:
        return os.path.join(self.dir, f"node{k}")

    def log(self, k: int) -> str:
        return os.path.join(self.dir, f"node{k}.log")

    def up(self) -> None:
        r = devcluster("up", "--nodes", str(self.nodes), "--dir", self.dir)
        if r.returncode != 0:
            raise SystemExit(f"devcluster up failed: {r.stdout}{r.stderr}")

    def down(self, out_dir: str) -> tuple[bool, str]:
        """Unmount every node and fsck the device; (clean, where the output went)."""
        r = devcluster("down", "--dir", self.dir, "--fsck", timeout=900)
        out = r.stdout + r.stderr
        path = os.path.join(out_dir, "down-fsck.txt")
        with open(path, "w") as f:
            f.write(out)
        return r.returncode == 0 and "fsck: clean" in out, path

    def mark_logs(self) -> None:
        self._log_marks = [os.path.getsize(self.log(k)) for k in self.node_ids()]

    def new_log_failures(self) -> list[str]:
        found = []
        for k, mark in zip(self.node_ids(), self._log_marks, strict=True):
            with open(self.log(k), errors="replace") as f:
                f.seek(mark)
                found += [f"node{k}: {line.strip()[:200]}" for line in f
                          if LOG_FAILURES.search(line)]
        return found

    def node_ids(self) -> range:
        return range(1, self.nodes + 1)

    def gone(self) -> list[int]:
        """Nodes whose mount no longer answers (a fenced or crashed node's is ENOTCONN)."""
        gone = []
        for k in self.node_ids():
            try:
                os.stat(self.mount(k))
            except OSError:
                gone.append(k)
        return gone


def run_on_all(cluster: Cluster, argvs: dict[int, list[str]], timeout: float,
               out_dir: str, label: str) -> list[str]:
    """Run one command per node at once; the failures, one line each."""
    procs = {}
    for k, argv in argvs.items():
        out = open(os.path.join(out_dir, f"{label}-node{k}.out"), "w")
        # (in out_dir: fio leaves its verify state files in the working directory)
        procs[k] = (subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                     cwd=out_dir), out)
    failures = []
    deadline = time.monotonic() + timeout
    try:
        for k, (proc, out) in procs.items():
            try:
                rc = proc.wait(max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                rc = proc.wait()
                failures.append(f"node{k}: still running after {timeout:.0f} s (killed)")
            out.close()
            if rc != 0:
                failures.append(f"node{k}: exit {rc}: {tail(out.name)}")
    finally:                 # interrupted: the cluster can go down only once they are gone
        for proc, _out in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return failures


def tail(path: str) -> str:
    with open(path, errors="replace") as f:
        lines = [ln.strip() for ln in f if re.search(r"fail|error|verify", ln, re.IGNORECASE)]
    return (lines[-1] if lines else "")[:200]


def stressor_step(cluster: Cluster, name: str, mode: str, seconds: int, instances: int,
                  out_dir: str) -> Step:
    argvs = {}
    for k in cluster.node_ids():
        where = os.path.join(cluster.mount(k), f"{mode}{k}" if mode == "own" else "shared")
        os.makedirs(where, exist_ok=True)
        argvs[k] = ["stress-ng", "--temp-path", where, f"--{name}", str(instances), "-t",
                    f"{seconds}s", "--verify", "--metrics-brief"]
    return finish(cluster, name, mode,
                  run_on_all(cluster, argvs, seconds + STEP_SLACK, out_dir, f"{name}-{mode}"))


def finish(cluster: Cluster, name: str, mode: str, failures: list[str]) -> Step:
    failures += cluster.new_log_failures()
    return Step(name, mode, not failures, "; ".join(failures) or "ok")


FIO_COMMON = ["--ioengine=psync", "--verify=crc32c", "--randrepeat=1"]


def fio_cross_node(cluster: Cluster, out_dir: str) -> Step:
    """Each node writes its 32 MiB region of one file at once; each region is then
    verified from the next node (its crc32c headers, fio --verify_only)."""
    os.makedirs(os.path.join(cluster.mount(1), "fio-shared"), exist_ok=True)

    def job(k: int, on: int) -> list[str]:
        return ["fio", *FIO_COMMON, f"--name=region{k}", "--rw=randwrite", "--bs=4k",
                f"--filename={os.path.join(cluster.mount(on), 'fio-shared', 'file')}",
                f"--offset={(k - 1) * 32}m", "--size=32m"]
    failures = run_on_all(cluster, {k: job(k, k) for k in cluster.node_ids()},
                          STEP_SLACK * 2, out_dir, "fio-write")
    for k in cluster.node_ids():
        on = k % cluster.nodes + 1
        failures += [f"region {k} verified on node{on}: {f}" for f in run_on_all(
            cluster, {on: job(k, on) + ["--verify_only", "--do_verify=1"]},
            STEP_SLACK, out_dir, f"fio-verify{k}")]
    return finish(cluster, "fio cross-node verify", "shared", failures)


def fio_own(cluster: Cluster, out_dir: str) -> Step:
    """Randwrite + verify jobs of several block sizes (one of them unaligned) in each
    node's own directory, every node at once."""
    argvs = {}
    for k in cluster.node_ids():
        where = os.path.join(cluster.mount(k), f"fio{k}")
        os.makedirs(where, exist_ok=True)
        argvs[k] = ["fio", *FIO_COMMON, f"--directory={where}", "--size=32m",
                    "--name=j4k", "--rw=randwrite", "--bs=4k",
                    "--name=j64k", "--rw=randwrite", "--bs=64k",
                    "--name=j1m", "--rw=write", "--bs=1m",
                    "--name=junaligned", "--rw=randwrite", "--bsrange=512-16k",
                    "--bs_unaligned=1", "--verify=md5"]
    return finish(cluster, "fio randwrite+verify", "own",
                  run_on_all(cluster, argvs, STEP_SLACK * 2, out_dir, "fio-own"))


def missing_tools(want_fio: bool) -> list[str]:
    tools = ["stress-ng"] + (["fio"] if want_fio else [])
    return [t for t in tools if shutil.which(t) is None]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", required=True, help="the dev cluster's directory (made)")
    p.add_argument("--nodes", type=int, default=3)
    p.add_argument("--seconds", type=int, default=10, help="per stressor (default 10)")
    p.add_argument("--stressors", default=DEFAULT_STRESSORS, help="comma-separated")
    p.add_argument("--instances", type=int, default=1, help="of each stressor per node")
    p.add_argument("--modes", default="own,shared", help="own, shared or both")
    p.add_argument("--no-fio", action="store_true")
    p.add_argument("--keep", action="store_true", help="leave the cluster up")
    args = p.parse_args()
    missing = missing_tools(not args.no_fio)
    if missing:
        print(f"stressng: missing {', '.join(missing)} (apt-get install -y stress-ng fio)")
        return 2
    out_dir = os.path.join(args.dir, "stressng-out")
    cluster = Cluster(os.path.abspath(args.dir), args.nodes)
    cluster.up()
    os.makedirs(out_dir, exist_ok=True)
    steps: list[Step] = []
    fsck_ok, fsck_out = True, ""
    try:
        for mode in args.modes.split(","):
            for name in filter(None, args.stressors.split(",")):
                cluster.mark_logs()
                steps.append(stressor_step(cluster, name, mode, args.seconds,
                                           args.instances, out_dir))
                print(f"{name:12} {mode:6} {'ok' if steps[-1].ok else 'FAIL'}"
                      f"{'' if steps[-1].ok else ': ' + steps[-1].detail}", flush=True)
                if cluster.gone():
                    raise Stop(f"node(s) {cluster.gone()} gone after {name} ({mode})")
        if not args.no_fio:
            for run in (fio_cross_node, fio_own):
                cluster.mark_logs()
                steps.append(run(cluster, out_dir))
                print(f"{steps[-1].name}: {steps[-1].detail}", flush=True)
    except Stop as stop:
        print(f"stopped: {stop}")
        steps.append(Step("(rest)", "", False, str(stop)))
    finally:
        if not args.keep:
            fsck_ok, fsck_out = cluster.down(out_dir)
    failed = [s for s in steps if not s.ok]
    fsck_note = "clean" if fsck_ok else f"NOT clean, see {fsck_out}"
    print(f"{len(steps) - len(failed)} passed, {len(failed)} failed"
          + ("" if args.keep else f"; down --fsck: {fsck_note}"))
    return 0 if not failed and fsck_ok else 1


if __name__ == "__main__":
    sys.exit(main())
