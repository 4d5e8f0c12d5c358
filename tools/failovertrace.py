#!/usr/bin/env python3
"""Every syscall a survivor makes while it takes over from a killed node, by step.

    python3 tools/failovertrace.py [--dir DIR] [--size 1G] [--keep]

It starts a 3-node dev cluster (tools/devcluster, with CLUSTERFS_AUDIT_FAILOVER=1),
puts a light writer on every node (a 4-8 KiB file written and fsync'd every 20 ms),
attaches `strace -f` to the mount processes of nodes 2 and 3, kills node 1 (kill -9),
waits until both survivors logged their journal recovery done, lets them run a
second more, detaches and takes the cluster down. Then, for each survivor, it cuts
its trace at the log lines it wrote (they are write(2, ...) calls in the trace):

    steady      from attaching to the kill (the baseline: heartbeats, the writer)
    detection   kill .. "installed view" (a view without node 1: detection, agreement)
    fencing     .. "fenced [1]" (the coordinator fences; the others wait for FENCE_DONE)
    dlm         .. "locking resumed" (DLM recovery)
    journal     .. "journal recovery done" (the replay of node 1's journal)
    after       .. the end (serving again)

and prints, per step, how often each syscall was made, which of them name a path
or make a thread, and which syscall names were not seen in the steady state. This
is how docs/recovery.md's list ("What the failover path asks of the host") was
measured. Needs root and strace (apt-get install strace); not used by the tests.
Exit status: 0 done, 1 something failed.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TOOLS = Path(__file__).resolve().parent
DEVCLUSTER = [sys.executable, str(TOOLS / "devcluster")]
CLUSTERFS = [sys.executable, "-m", "clusterfs.cli"]
WAIT = 120.0            # seconds a recovery may take before the run counts as failed



def kill_steps(victim: int) -> tuple[tuple[str, str], ...]:
    """The steps of a survivor, each ending at the first log line (written after the
    kill) that matches its marker."""
    return (("detection", rf"installed view: members \[[^\]]*\] joined \[[^\]]*\] "
                          rf"left \[{victim}\]"),
            ("fencing", rf"fenced \[{victim}\]"),
            ("dlm", r"locking resumed"),
            ("journal", r"journal recovery done"))


STEPS = kill_steps(1)
PATH_CALLS = {"open", "openat", "openat2", "creat", "stat", "lstat", "newfstatat", "statx",
              "access", "faccessat", "faccessat2", "readlink", "readlinkat", "execve",
              "unlink", "unlinkat", "rename", "renameat", "renameat2", "mkdir", "mkdirat",
              "chdir", "getdents64", "inotify_add_watch"}
THREAD_CALLS = {"clone", "clone3", "fork", "vfork"}
MEMORY_CALLS = {"mmap", "munmap", "mremap", "brk", "madvise", "mprotect", "mlock",
                "mlockall"}

LINE = re.compile(r"^(\d+)\s+(\d+\.\d+)\s+(?:<\.\.\. (\w+) resumed>|(\w+)\((.*))")
FD = re.compile(r"^(?:\d+|AT_FDCWD)<([^>]*)>")
UNCOUNTED = {"epoll_wait", "futex", "epoll_ctl", "getpid", "gettid"}     # no fd of interest

WRITER = r"""
import os, sys, time
root, stop = sys.argv[1], sys.argv[2]
i = 0
while not os.path.exists(stop):
    with open(os.path.join(root, f"f{i % 20}"), "wb") as f:
        f.write(os.urandom(4096 * (1 + i % 2)))
        f.flush()
        os.fsync(f.fileno())
    i += 1
    time.sleep(0.02)
"""


class Failure(Exception):
    pass


def devcluster(*args: str) -> str:
    r = subprocess.run([*DEVCLUSTER, *args], capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        raise Failure(f"devcluster {' '.join(args)}: {r.stdout}{r.stderr}")
    return r.stdout


def attach(pid: int, out: Path) -> subprocess.Popen:
    proc = subprocess.Popen(["strace", "-f", "-ttt", "-y", "-s", "160", "-o", str(out),
                             "-p", str(pid)], stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)                        # attached to every thread by now
    if proc.poll() is not None:
        raise Failure(f"strace -p {pid}: {proc.stderr.read()}")
    return proc


def detach(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)    # strace detaches and exits
        proc.wait(30)


def wait_logged(log: Path, pattern: str, since: int) -> None:
    deadline = time.monotonic() + WAIT
    while not re.search(pattern, log.read_bytes()[since:].decode(errors="replace")):
        if time.monotonic() > deadline:
            raise Failure(f"{log}: no {pattern!r} within {WAIT:.0f} s")
        time.sleep(0.05)


def cut(trace: Path, killed_at: float, steps_of: tuple[tuple[str, str], ...] = STEPS
        ) -> dict[str, list[tuple[str, str]]]:
    """The trace's calls (name, arguments) by step; a step ends with the log line
    of its marker."""
    order = [name for name, _ in steps_of] + ["after"]
    markers = dict(steps_of)
    steps: dict[str, list[tuple[str, str]]] = collections.defaultdict(list)
    step = "steady"
    for line in trace.read_text(errors="replace").splitlines():
        m = LINE.match(line)
        if m is None or m.group(3):        # a resumed call was counted when it began
            continue
        at, name, args = float(m.group(2)), m.group(4), m.group(5)
        if step == "steady" and at >= killed_at:
            step = order[0]
        steps[step].append((name, args))
        if step in markers and name == "write" and re.search(markers[step], args):
            step = order[order.index(step) + 1]
    return steps


def report(node: int, steps: dict[str, list[tuple[str, str]]],
           steps_of: tuple[tuple[str, str], ...] = STEPS) -> str:
    steady = {name for name, _ in steps.get("steady", [])}
    out = [f"== node {node}"]
    for step in ["steady", *(s for s, _ in steps_of), "after"]:
        calls = steps.get(step, [])
        counts = collections.Counter(name for name, _ in calls)
        out.append(f"-- {step}: {len(calls)} calls: "
                   + ", ".join(f"{n} {c}" for n, c in counts.most_common()))
        if step != "steady":
            new = sorted(set(counts) - steady)
            out.append(f"   not in the steady state: {', '.join(new) or 'none'}")
        targets = collections.Counter((name, _target(args)) for name, args in calls
                                      if name not in UNCOUNTED)
        out.append("   on: " + ", ".join(f"{n}({t}) {c}" for (n, t), c in
                                         sorted(targets.items())))
        for name, args in calls:
            if name in PATH_CALLS or name in THREAD_CALLS:
                out.append(f"   {name}({args[:150]}")
        memory = {n: c for n, c in counts.items() if n in MEMORY_CALLS}
        if memory:
            out.append(f"   memory: {memory}")
    return "\n".join(out)


def _target(args: str) -> str:
    """What a call's first argument names: a file's path, or the kind of descriptor."""
    m = FD.match(args)
    if m is None:
        return "-"
    what = m.group(1)
    kind = re.match(r"^(TCP|UNIX|UDP|NETLINK|pipe|anon_inode|socket):", what)
    return kind.group(1) if kind else what


def audit_of(control: str) -> dict:
    r = subprocess.run([*CLUSTERFS, "status", "--control", control, "--json"],
                       capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        raise Failure(f"status {control}: {r.stderr}")
    return json.loads(r.stdout).get("failover", {})


def run(directory: Path, size: str) -> str:
    os.environ["CLUSTERFS_AUDIT_FAILOVER"] = "1"
    devcluster("up", "--nodes", "3", "--dir", str(directory), "--size", size)
    stop = directory / "stop-writers"
    writers: list[subprocess.Popen] = []
    tracers: dict[int, subprocess.Popen] = {}
    try:
        state = json.loads((directory / "devcluster.json").read_text())
        nodes = {int(k): n for k, n in state["nodes"].items()}
        for n in nodes.values():
            root = Path(n["mountpoint"]) / f"w{n['id']}"
            root.mkdir()
            writers.append(subprocess.Popen([sys.executable, "-c", WRITER, str(root),
                                             str(stop)]))
        for n in (2, 3):
            tracers[n] = attach(nodes[n]["pid"], directory / f"node{n}.trace")
        time.sleep(2.0)
        sizes = {n: Path(nodes[n]["log"]).stat().st_size for n in (2, 3)}
        killed_at = time.time()
        devcluster("kill", "1", "--dir", str(directory))
        writers[0].kill()                  # node 1's writer dies with it
        for n in (2, 3):
            wait_logged(Path(nodes[n]["log"]), STEPS[-1][1], sizes[n])
        time.sleep(1.0)
        for tracer in tracers.values():
            detach(tracer)
        audits = {n: audit_of(nodes[n]["control"] or "") for n in (2, 3)
                  if nodes[n]["control"]}
    finally:
        stop.touch()
        for tracer in tracers.values():
            detach(tracer)
        for w in writers:
            try:
                w.wait(30)
            except subprocess.TimeoutExpired:
                w.kill()
        devcluster("down", "--dir", str(directory), "--fsck")
    out = [report(n, cut(directory / f"node{n}.trace", killed_at)) for n in (2, 3)]
    for n, audit in audits.items():
        out.append(f"== node {n} audit: {len(audit.get('during', []))} events during "
                   f"phases {[p['phase'] for p in audit.get('phases', [])]}")
    return "\n".join(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", help="where the cluster and the traces go (kept)")
    p.add_argument("--size", default="1G")
    args = p.parse_args()
    if shutil.which("strace") is None:
        print("failovertrace: needs strace (apt-get install strace)", file=sys.stderr)
        return 1
    directory = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="fotrace-"))
    directory.mkdir(parents=True, exist_ok=True)
    try:
        print(run(directory, args.size))
    except Failure as exc:
        print(f"failovertrace: {exc}", file=sys.stderr)
        return 1
    finally:
        if not args.dir:
            shutil.rmtree(directory, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
