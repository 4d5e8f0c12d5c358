#!/usr/bin/env python3
"""Recovery-time benchmark: kill a node of a loaded cluster, time until the others serve.

    python3 tools/recoverybench.py [--kills 10] [--nodes 3] [--how kill|freeze]
                                   [--failure-timeout 3.0] [--heartbeat-interval 0.5]
                                   [--dir DIR] [--size 2G] [--json FILE]
                                   [--fencing process|scsi-pr] [--proxy [--io-timeout S]]

It starts a dev cluster (tools/devcluster up, default timings unless told otherwise),
puts `tools/stress` on every node (each in its own directory, for the whole run), and
then, --kills times, rotating over the nodes:

1. the victim writes and fsyncs a file of its own, `hot/k<i>` (so it holds that
   file's and the directory's locks, cached, when it dies);
2. at t0 the victim's mount process is killed (`kill`: SIGKILL, so the kernel closes its
   sockets; `freeze`: SIGSTOP, a silent death such as a power cut or a hung host, which
   only the failure timeout detects; the fencing agent then kills the frozen process),
   and its stress run with it;
3. from t0 this process (not a node) opens `hot/k<i>` on a survivor, writes and fsyncs
   it: that needs the locks the dead node held, so it returns only once the survivors
   have fenced it, recovered the DLM and replayed its journal. t0 to its return is the
   figure, "serving again";
4. meanwhile it tails the survivors' logs and stamps the first line of each step:
   connection lost (the kernel reset the dead process's sockets; not with `freeze`),
   detection (a view without the victim installed), fencing confirmed, and the last
   survivor's DLM recovery done (locking resumed) and journal recovery done, all from
   t0; and it reads the survivors' `clusterfs status` for the journal replay's own
   time;
5. the victim is started again (`devcluster start`), with a new stress run, and the
   next kill comes after the cluster has run under load for --settle seconds.

Issue 8's variants. `--fencing scsi-pr`: the cluster runs on a LUN of a private tgtd
on 127.0.0.1 (tests/iscsiutil.py, killed at the end) and fences through SCSI-3
reservations (a PREEMPT of the victim's key) instead of killing its process; a frozen
victim is killed by this process only after the step times are taken, so that it can
be started again. `--proxy`: the last node has no path to the disk and mounts
through the others' block servers (`devcluster up --storage-group`); the victims are
the servers, the probe write runs on the proxy node, and two more steps are stamped
from its log: it suspected the victim (its I/O to it timed out, or the connection
broke) and its first I/O re-targeted to another server (with `--how freeze`: the
time from the server's SIGSTOP to the proxy's first answered re-targeted request).

At the end the stress runs stop and must report no failure, `devcluster down --fsck`
must be clean, and it prints a line per kill, then the median and worst of each step.
Exit status: 0 done, 1 something failed (a stress failure, fsck, a step not seen), 2
bad input. It needs root; it removes the cluster it made (also on failure or Ctrl-C),
keeping the logs in DIR when it was given.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

TOOLS = Path(__file__).resolve().parent
DEVCLUSTER = [sys.executable, str(TOOLS / "devcluster")]
STRESS = [sys.executable, str(TOOLS / "stress")]
STEP_TIMEOUT = 120.0     # seconds a kill's recovery may take before it counts as failed
LOG_POLL = 0.005         # seconds between looks at the survivors' logs
sys.path.insert(0, str(TOOLS.parent / "tests"))     # iscsiutil: a private tgtd
sys.path.insert(0, str(TOOLS))
from devclusterlib import abort_fuse  # noqa: E402  (after the path: a tool beside us)

# the first line of each step, in a survivor's log, about victim V
STEPS = {
    "conn_lost": r"connection to peer (\d+) lost",
    "detected": r"installed view: members \[[^\]]*\] joined \[[^\]]*\] left \[([^\]]*)\]",
    "fenced": r"gen \d+: fenced \[([^\]]*)\]",
    "dlm_done": r"recover: 8 done: locking resumed",
    "replay_done": r"journal recovery done in",
    # the proxy node's (--proxy)
    "suspected": r"node (\d+) is suspected silent",
    "retarget": r"BLOCK_[A-Z]+ re-targeted to block server \d+",
}


class Failure(Exception):
    pass


@dataclass
class Kill:
    index: int
    victim: int
    prober: int
    how: str
    steps: dict[str, float] = field(default_factory=dict)   # step -> s after t0
    serving: float | None = None                             # probe returned, s after t0
    replay_s: float | None = None       # the replay itself (the survivor that did it)
    replayed: list = field(default_factory=list)


# ----------------------------------------------------------------------------
# the dev cluster


def devcluster(*args: str, timeout: float = 300) -> str:
    r = subprocess.run([*DEVCLUSTER, *args], capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise Failure(f"devcluster {' '.join(args)}: {(r.stderr or r.stdout).strip()}")
    return r.stdout


def record(directory: str) -> dict:
    with open(os.path.join(directory, "devcluster.json")) as f:
        return json.load(f)


def node_status(node: dict, clusterfs: list[str]) -> dict:
    """A node's `clusterfs status --json` (through its control socket); {} if no answer."""
    r = subprocess.run([*clusterfs, "status", "--json", "--control", node["control"]],
                       capture_output=True, text=True, timeout=30,
                       env=dict(os.environ, PYTHONPATH=str(TOOLS.parent)))
    if r.returncode != 0:
        return {}
    return json.loads(r.stdout)


# ----------------------------------------------------------------------------
# load


class Load:
    """tools/stress on every node, each run in its own session (killed by its pid)."""

    def __init__(self, directory: str, work: str) -> None:
        self.dir = directory
        self.work = work
        self.stop_file = os.path.join(work, "stop-stress")
        self.runs: dict[int, tuple[subprocess.Popen, str]] = {}
        self.started = 0

    def start(self, node: int, tag: str) -> None:
        """A stress run on node, in its own new directory n<node>-<tag>."""
        self.started += 1
        out = os.path.join(self.work, f"stress-n{node}-{tag}.out")
        argv = [*STRESS, "run", "--dir", os.path.join(self.dir, f"node{node}"),
                "--seed", str(1000 * self.started), "--procs", "1",
                "--private", f"n{node}-{tag}", "--shared", "", "--progress", "1000",
                "--stop-file", self.stop_file,
                "--log", os.path.join(self.work, f"stress-n{node}-{tag}.log")]
        with open(out, "wb") as f:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=f,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        self.runs[node] = (proc, out)

    def kill(self, node: int) -> None:
        proc, _ = self.runs.pop(node)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)

    def stop(self) -> list[str]:
        """Stop every run; the failures they reported."""
        Path(self.stop_file).touch()
        problems = []
        for node, (proc, out) in list(self.runs.items()):
            try:
                proc.wait(STEP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.kill(node)
                problems.append(f"stress on node {node} did not stop ({out})")
                continue
            text = Path(out).read_text(errors="replace")
            if proc.returncode != 0 or "stress: 0 failure(s)" not in text:
                problems.append(f"stress on node {node} failed ({out}):\n"
                                + "\n".join(text.splitlines()[-12:]))
        self.runs.clear()
        return problems

    def abort(self) -> None:
        for node in list(self.runs):
            self.kill(node)


REWRITER = r"""
import os, sys
path, stop = sys.argv[1], sys.argv[2]
fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
rounds = 0
while not os.path.exists(stop):
    os.pwrite(fd, os.urandom(1 << 20), 0)
    os.fsync(fd)
    rounds += 1
print("rewrites:", rounds, flush=True)
"""


class Rewriter:
    """With --proxy: one process on the proxy node rewriting and fsyncing 1 MiB of a
    file of its own, all along. Its locks stay cached on the proxy node, so a frozen
    server stalls it only through I/O: it is what the re-target step times (the stress
    runs soon wait on locks mastered by the frozen node instead)."""

    def __init__(self, mountpoint: str, work: str, stop_file: str) -> None:
        self.out = os.path.join(work, "rewriter.out")
        with open(self.out, "wb") as f:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", REWRITER, os.path.join(mountpoint, "proxy-rw"),
                 stop_file], stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT,
                start_new_session=True)

    def stop(self) -> list[str]:
        """Its failure, if it had one (the stop file is made by Load.stop)."""
        try:
            self.proc.wait(STEP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.abort()
            return [f"the proxy node's rewriter did not stop ({self.out})"]
        text = Path(self.out).read_text(errors="replace")
        if self.proc.returncode != 0:
            return [f"the proxy node's rewriter failed ({self.out}):\n{text[-2000:]}"]
        print(f"proxy node's rewriter: {text.strip()} (no error)", flush=True)
        return []

    def abort(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)


# ----------------------------------------------------------------------------
# the survivors' logs, stamped as lines appear


class LogWatch(threading.Thread):
    """Follows the given log files from their current ends; every new line with the
    monotonic time it was first seen."""

    def __init__(self, logs: dict[int, str]) -> None:
        super().__init__(daemon=True)
        self.files = {n: open(path, "rb") for n, path in logs.items()}  # noqa: SIM115
        for f in self.files.values():
            f.seek(0, os.SEEK_END)
        self.lines: list[tuple[float, int, str]] = []
        self.halt = threading.Event()
        self.lock = threading.Lock()
        self.partial: dict[int, bytes] = dict.fromkeys(self.files, b"")

    def run(self) -> None:
        while not self.halt.is_set():
            for n, f in self.files.items():
                data = f.read()
                if not data:
                    continue
                now = time.monotonic()
                *done, self.partial[n] = (self.partial[n] + data).split(b"\n")
                with self.lock:
                    self.lines += [(now, n, line.decode(errors="replace")) for line in done]
            time.sleep(LOG_POLL)

    def close(self) -> None:
        self.halt.set()
        self.join()
        for f in self.files.values():
            f.close()

    def first(self, step: str, victim: int) -> tuple[float, int] | None:
        """When the first survivor logged `step` about the victim, and which."""
        pattern = re.compile(STEPS[step])
        with self.lock:
            for t, n, line in self.lines:
                m = pattern.search(line)
                if m and (not m.groups() or str(victim) in m.group(1).split(", ")):
                    return t, n
        return None

    def last(self, step: str, nodes: list[int]) -> float | None:
        """When the last of `nodes` logged `step` (each's first time); None if one has not."""
        pattern = re.compile(STEPS[step])
        seen: dict[int, float] = {}
        with self.lock:
            for t, n, line in self.lines:
                if n not in seen and pattern.search(line):
                    seen[n] = t
        return max(seen.values()) if all(n in seen for n in nodes) else None


# ----------------------------------------------------------------------------
# one kill


def write_fsync(path: str, data: bytes, create: bool = False) -> None:
    fd = os.open(path, os.O_WRONLY | (os.O_CREAT if create else 0), 0o644)
    try:
        os.pwrite(fd, data, 0)
        os.fsync(fd)
    finally:
        os.close(fd)


def one_kill(args: argparse.Namespace, rec: dict, load: Load, k: Kill) -> None:
    nodes = rec["nodes"]
    victim = nodes[str(k.victim)]
    survivors = [int(n) for n in nodes if int(n) != k.victim]
    name = f"hot/k{k.index}"
    write_fsync(os.path.join(victim["mountpoint"], name), b"victim %d" % k.index, create=True)
    watch = LogWatch({n: nodes[str(n)]["log"] for n in survivors})
    watch.start()
    try:
        t0 = time.monotonic()
        os.kill(victim["pid"], signal.SIGKILL if args.how == "kill" else signal.SIGSTOP)
        if args.how == "kill":
            abort_fuse(victim["mountpoint"])   # its kernel mount dies with it, as a host's
        load.kill(k.victim)
        write_fsync(os.path.join(nodes[str(k.prober)]["mountpoint"], name),
                    b"survivor %d" % k.index)
        k.serving = time.monotonic() - t0
        wait_steps(watch, k, survivors, t0)
    finally:
        watch.close()
    read_replay(rec, survivors, k)


def wait_steps(watch: LogWatch, k: Kill, survivors: list[int], t0: float) -> None:
    """Until every survivor logged its journal recovery; the steps' times into k."""
    deadline = time.monotonic() + STEP_TIMEOUT
    while watch.last("replay_done", survivors) is None:
        if time.monotonic() > deadline:
            raise Failure(f"kill {k.index}: the survivors did not all log their journal "
                          f"recovery in {STEP_TIMEOUT:.0f} s")
        time.sleep(0.05)
    # a frozen process's sockets stay open until its fence kills it: not a step then
    seen = watch.first("conn_lost", k.victim) if k.how == "kill" else None
    if seen is not None:
        k.steps["conn_lost"] = seen[0] - t0
    for step in ("suspected", "retarget"):       # only a proxy node logs them
        seen = watch.first(step, k.victim)
        if seen is not None:
            k.steps[step] = seen[0] - t0
    for step in ("detected", "fenced"):
        seen = watch.first(step, k.victim)
        if seen is None:
            raise Failure(f"kill {k.index}: no survivor logged step {step!r}")
        k.steps[step] = seen[0] - t0
    for step in ("dlm_done", "replay_done"):
        k.steps[step] = watch.last(step, survivors) - t0


def read_replay(rec: dict, survivors: list[int], k: Kill) -> None:
    """The replay's own time, from the survivor that replayed something (else the
    longest any survivor's replay step took: reading clean journals)."""
    best: tuple[float, list] | None = None
    for n in survivors:
        last = node_status(rec["nodes"][str(n)], rec["clusterfs"]).get("mount", {}).get(
            "last_recovery") or {}
        if "replay_s" not in last:
            continue
        replayed = [r for r in last["replayed"] if r["transactions"]]
        cand = (last["replay_s"], replayed)
        if best is None or (replayed and not best[1]) or (
                bool(replayed) == bool(best[1]) and cand[0] > best[0]):
            best = cand
    if best is not None:
        k.replay_s, k.replayed = best


def restart(args: argparse.Namespace, load: Load, k: Kill) -> None:
    if args.how == "freeze" and args.fencing != "process":
        # fenced on the disk but still frozen (nothing killed it): kill it to restart it
        devcluster("kill", str(k.victim), "--dir", args.dir)
    devcluster("start", str(k.victim), "--dir", args.dir)
    load.start(k.victim, f"k{k.index}")
    time.sleep(args.settle)          # load on a full cluster before the next kill


# ----------------------------------------------------------------------------
# report


STEP_NAMES = [("conn_lost", "connection lost"), ("suspected", "proxy suspected"),
              ("retarget", "proxy re-targeted"), ("detected", "detected"),
              ("fenced", "fenced"), ("dlm_done", "DLM done"), ("replay_done", "replay done")]


def kill_line(k: Kill) -> str:
    steps = "  ".join(f"{label} {k.steps[s]:6.3f}" for s, label in STEP_NAMES
                      if s in k.steps)
    replay = f"{k.replay_s:.3f}" if k.replay_s is not None else "?"
    txns = sum(r["transactions"] for r in k.replayed)
    return (f"kill {k.index:2d}: node {k.victim} ({k.how}), probe on node {k.prober}:  "
            f"{steps}  serving {k.serving:6.3f} s  (replay itself {replay} s, "
            f"{txns} transactions)")


def summary(kills: list[Kill]) -> list[str]:
    def row(label: str, values: list[float]) -> str:
        return (f"  {label:<22} median {statistics.median(values):6.3f} s   "
                f"worst {max(values):6.3f} s   best {min(values):6.3f} s")
    out = [f"{len(kills)} kill(s), times from the kill:"]
    for s, label in STEP_NAMES:
        values = [k.steps[s] for k in kills if s in k.steps]
        if values:
            out.append(row(label, values))
    replays = [k.replay_s for k in kills if k.replay_s is not None]
    if replays:
        out.append(row("journal replay itself", replays))
    out.append(row("SERVING AGAIN", [k.serving for k in kills]))
    return out


# ----------------------------------------------------------------------------
# the run


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kills", type=int, default=10, help="kills (default 10)")
    p.add_argument("--nodes", type=int, default=3, help="nodes (default 3)")
    p.add_argument("--how", choices=("kill", "freeze"), default="kill",
                   help="kill: SIGKILL (default); freeze: SIGSTOP, detected by timeout")
    p.add_argument("--heartbeat-interval", type=float, default=0.5, metavar="S")
    p.add_argument("--failure-timeout", type=float, default=3.0, metavar="S")
    p.add_argument("--settle", type=float, default=3.0, metavar="S",
                   help="seconds of load on the full cluster before each kill (default 3)")
    p.add_argument("--dir", help="where the cluster goes (default: a temporary directory, "
                                 "removed at the end)")
    p.add_argument("--size", default="2G", help="device size (default 2G)")
    p.add_argument("--json", help="write every kill's figures here")
    p.add_argument("--fencing", choices=("process", "scsi-pr"), default="process",
                   help="process: kill -9 by the survivors (default); scsi-pr: the cluster "
                        "on a private tgtd LUN, fenced by SCSI-3 PREEMPT")
    p.add_argument("--proxy", action="store_true",
                   help="the last node mounts through the others' block servers; the "
                        "victims are the servers, the probe runs on the proxy node")
    p.add_argument("--io-timeout", type=float, default=0.5, metavar="S",
                   help="the proxy's io_timeout, with --proxy (default 0.5)")
    return p


def _interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")     # so that the cluster is taken down


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.kills < 1 or args.nodes < 3:
        print("recoverybench: --kills >= 1 and --nodes >= 3 (a survivor pair keeps quorum)",
              file=sys.stderr)
        return 2
    own = args.dir is None
    if own:
        args.dir = tempfile.mkdtemp(prefix="rbench-", dir="/tmp")
    signal.signal(signal.SIGTERM, _interrupted)
    try:
        return run(args)
    except Failure as exc:
        print(f"recoverybench: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("recoverybench: interrupted", file=sys.stderr)
        return 130
    finally:
        if own:
            shutil.rmtree(args.dir, ignore_errors=True)


def servers(args: argparse.Namespace) -> list[int]:
    """The nodes with a path to the disk (with --proxy all but the last)."""
    return list(range(1, args.nodes if args.proxy else args.nodes + 1))


def run(args: argparse.Namespace) -> int:
    if args.fencing == "process":
        return run_on(args, [])
    import iscsiutil

    why = iscsiutil.missing_prerequisites()
    if why:
        raise Failure(why)
    from devclusterlib import parse_size

    size = parse_size(args.size)
    work = os.path.join(args.dir, "tgtd")
    os.makedirs(work, exist_ok=True)
    with iscsiutil.target([size], workdir=work) as target:
        print(f"recoverybench: the cluster's disk is LUN {target.url()} of a private tgtd "
              f"(pid {target.proc.pid})", flush=True)
        return run_on(args, ["--device", target.url(), "--fencing", "scsi-pr"])


def run_on(args: argparse.Namespace, device: list[str]) -> int:
    group = servers(args)
    print(f"recoverybench: {args.nodes} nodes in {args.dir}, {args.kills} kill(s) "
          f"({args.how}), heartbeat {args.heartbeat_interval} s, failure timeout "
          f"{args.failure_timeout} s, fencing {args.fencing}"
          + (f", node {args.nodes} proxies through {group} (io_timeout {args.io_timeout} s)"
             if args.proxy else ""), flush=True)
    proxy = (["--storage-group", ",".join(map(str, group)), "--io-timeout",
              str(args.io_timeout)] if args.proxy else [])
    devcluster("up", "--nodes", str(args.nodes), "--dir", args.dir, "--size", args.size,
               "--heartbeat-interval", str(args.heartbeat_interval),
               "--failure-timeout", str(args.failure_timeout), *device, *proxy)
    work = os.path.join(args.dir, "bench")
    os.makedirs(work, exist_ok=True)
    load = Load(args.dir, work)
    rewriter: Rewriter | None = None
    kills: list[Kill] = []
    problems: list[str] = []
    try:
        rec = record(args.dir)
        os.mkdir(os.path.join(rec["nodes"]["1"]["mountpoint"], "hot"))
        for n in range(1, args.nodes + 1):
            load.start(n, "k0")
        if args.proxy:
            rewriter = Rewriter(rec["nodes"][str(args.nodes)]["mountpoint"], work,
                                load.stop_file)
        time.sleep(args.settle)
        for i in range(args.kills):
            victim = group[i % len(group)]
            prober = args.nodes if args.proxy else 1 + (victim % args.nodes)
            k = Kill(i + 1, victim, prober, args.how)
            one_kill(args, record(args.dir), load, k)
            kills.append(k)
            print(kill_line(k), flush=True)
            restart(args, load, k)
        problems += load.stop()
        if rewriter is not None:
            problems += rewriter.stop()
    finally:
        load.abort()
        if rewriter is not None:
            rewriter.abort()
        r = subprocess.run([*DEVCLUSTER, "down", "--dir", args.dir, "--fsck"],
                           capture_output=True, text=True, timeout=600)
        if r.returncode != 0:
            problems.append(f"devcluster down --fsck:\n{r.stdout[-3000:]}{r.stderr}")
    for line in summary(kills):
        print(line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "kills": [asdict(k) for k in kills]}, f, indent=1)
    for p in problems:
        print(f"recoverybench: {p}", file=sys.stderr)
    if not problems:
        print("stress runs clean, fsck clean")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
