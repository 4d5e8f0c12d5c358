"""devcluster: a local multi-node clusterfs cluster on one loop device, for development.

    tools/devcluster up --nodes 3 --dir DIR [--size 2G] [--journals N] [--timeout S]
                        [--heartbeat-interval 0.5] [--failure-timeout 3.0]
                        [--device DEV] [--fencing process|scsi-pr]
                        [--storage-group 1,2] [--io-timeout S] [--mount-options OPTS]
    tools/devcluster status --dir DIR
    tools/devcluster kill K --dir DIR
    tools/devcluster start K [K...] --dir DIR [--timeout S]
    tools/devcluster down --dir DIR [--fsck] [--timeout S]

`up` makes DIR/disk.img (sparse), attaches it to a free loop device, formats it
with one journal per node, writes DIR/cluster.key and DIR/cluster.toml (nodes
1..N on free 127.0.0.1 ports), starts one `clusterfs mount -f` process per
node (its own session, log in DIR/nodeK.log, mounted at DIR/nodeK) and returns
once every mount is live. DIR/devcluster.json records what was made, so the
other subcommands (and a `down` after any partial failure) know exactly what
is ours: the loop device is detached only while it still serves DIR/disk.img,
a process is signalled only while its pid still names the process we started
(start time and command line), and only DIR/nodeK mountpoints are ever
unmounted. `down` runs `clusterfs umount` for every node at once, and after its
--timeout SIGTERM, then SIGKILL, for nodes still running.

Variants of `up` (the benchmarks of issue 8 use them): `--device DEV` formats and
uses DEV (a block device or an iscsi:// URL someone else provides) instead of a
loop device over DIR/disk.img; it is never detached. `--fencing scsi-pr` fences
through SCSI-3 reservations on that LUN (the config's [fencing] table; no pid
records) instead of the process agent. `--storage-group 1,2` makes those nodes
serve the disk (block servers on free ports) and every other node mount through
them (proxy I/O, docs/storage.md); the group's nodes are started first.

Exit status: 0 done; 1 something failed (said on stderr); 2 bad input
(unknown DIR, node out of range, bad option), nothing was changed.

The nodes run `python3 -m clusterfs.cli` from the checkout this script lives
in. DEVCLUSTER_CLUSTERFS (a command line) replaces that command, for tests.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import itertools
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

CLUSTER_NAME = "devcl"
STATE_FILE = "devcluster.json"
LOCK_FILE = ".devcluster.lock"
STATE_VERSION = 1
MAX_NODES = 32
MIN_SIZE = 64 << 20
LOG_TAIL_LINES = 25
STATUS_TIMEOUT = 15.0        # seconds a node's `clusterfs status` may take
SUN_PATH_MAX = 108           # sizeof(sockaddr_un.sun_path), with its NUL
EXIT_FAIL = 1
EXIT_USAGE = 2

CHECKOUT = Path(__file__).resolve().parent.parent

# The FUSE-connection helpers live in clusterfs (the process fencing agent aborts a
# half-dead node's mount with them); this checkout's clusterfs, as the nodes run it.
if str(CHECKOUT) not in sys.path:
    sys.path.insert(0, str(CHECKOUT))
from clusterfs.fence.fuseconn import (  # noqa: E402, F401  (the tools and tests use them)
    abort_fuse,
    abort_fuse_connection,
    fuse_connection,
)


class Failure(Exception):
    """Something could not be done; one line, exit 1."""


class BadInput(Exception):
    """The arguments name something that is not there; one line, exit 2."""


# ----------------------------------------------------------------------------
# the clusterfs command


def clusterfs_command() -> list[str]:
    override = os.environ.get("DEVCLUSTER_CLUSTERFS")
    if override:
        return shlex.split(override)
    return [sys.executable, "-m", "clusterfs.cli"]


def child_env() -> dict[str, str]:
    """The environment of every clusterfs process: this checkout's clusterfs first."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if (CHECKOUT / "clusterfs" / "__init__.py").exists():
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(CHECKOUT), env.get("PYTHONPATH", "")) if p)
    return env


def run_clusterfs(cmd: list[str], *args: str, timeout: float) -> subprocess.CompletedProcess:
    try:
        return subprocess.run([*cmd, *args], capture_output=True, text=True,
                              timeout=timeout, env=child_env(), stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise Failure(f"`clusterfs {' '.join(args)}` did not finish in {timeout:.0f} s") from None
    except OSError as exc:
        raise Failure(f"cannot run {shlex.join(cmd)}: {exc.strerror}") from None


def mount_options(cmd: list[str]) -> set[str]:
    """The long options `clusterfs mount --help` offers."""
    r = run_clusterfs(cmd, "mount", "--help", timeout=60)
    if r.returncode != 0:
        first = (r.stderr.strip() or r.stdout.strip() or "no output").splitlines()[0]
        raise Failure(f"`clusterfs mount --help` failed ({r.returncode}): {first}")
    return set(re.findall(r"--[a-z][a-z0-9-]*", r.stdout))


def last_line(r: subprocess.CompletedProcess) -> str:
    """The last line a command said (its error, usually)."""
    text = (r.stderr or "").strip() or (r.stdout or "").strip()
    return text.splitlines()[-1] if text else f"exit status {r.returncode}"


# ----------------------------------------------------------------------------
# processes, mounts, loop devices: only ever ours


def start_time(pid: int) -> int | None:
    """Start time (clock ticks since boot) of live process `pid`; None if gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def cmdline(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    return [a.decode(errors="replace") for a in raw.split(b"\0")[:-1]]


def node_alive(node: dict[str, Any]) -> bool:
    """True while the recorded pid still names the process we started for this node:
    same start time, and a command line naming this node id and mountpoint."""
    pid = node.get("pid")
    if not pid or start_time(pid) != node.get("start_time"):
        return False
    args = cmdline(pid)
    if not args:
        return False
    pairs = set(itertools.pairwise(args))
    return ("--node-id", str(node["id"])) in pairs and node["mountpoint"] in args


def wait_all_gone(nodes: list[dict[str, Any]], deadline: float) -> list[dict[str, Any]]:
    """Wait until none of `nodes` is alive or the deadline; returns those still alive."""
    while True:
        alive = [n for n in nodes if node_alive(n)]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.05)


def wait_gone(node: dict[str, Any], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while node_alive(node):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")


def mount_fstype(path: str) -> str | None:
    """The fstype of the mount at `path` from /proc/self/mountinfo (never stats the path,
    which would hang or fail on a FUSE mount whose server is dead); None if not mounted."""
    found = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if _OCTAL_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), fields[4]) == path:
                found = fields[fields.index("-") + 1]   # the last one is on top
    return found


def detach_mount(path: str) -> bool:
    """Lazily detach whatever is mounted at `path` (one of our DIR/nodeK); True if gone."""
    for cmd in (["fusermount3", "-u", "-z", path], ["umount", "-l", path]):
        if mount_fstype(path) is None:
            return True
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            subprocess.run(cmd, capture_output=True, timeout=30)
    return mount_fstype(path) is None


def loop_backing(dev: str) -> str | None:
    """The file loop device `dev` serves, or None if it serves nothing."""
    name = os.path.basename(dev)
    try:
        with open(f"/sys/block/{name}/loop/backing_file") as f:
            return f.read().rstrip("\n").removesuffix(" (deleted)")
    except OSError:
        return None


def loops_over(backing: str) -> list[str]:
    """Loop devices attached to `backing`."""
    r = subprocess.run(["losetup", "-j", backing, "-n", "-O", "NAME"],
                       capture_output=True, text=True)
    return r.stdout.split() if r.returncode == 0 else []


def detach_loop(dev: str, backing: str) -> str | None:
    """Detach `dev` if it still serves `backing`; None when done, else why not."""
    for _ in range(100):
        if loop_backing(dev) != backing:
            return None
        r = subprocess.run(["losetup", "-d", dev], capture_output=True, text=True)
        if r.returncode == 0 and loop_backing(dev) != backing:
            return None
        time.sleep(0.1)   # busy (a lazy unmount still releasing it), or autoclear pending
    return f"loop device {dev} still attached to {backing}: {r.stderr.strip() or 'busy'}"


def log_tail(path: str, since: int = 0, lines: int = LOG_TAIL_LINES) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(since)
            text = f.read().decode(errors="replace")
    except OSError as exc:
        return f"    (cannot read {path}: {exc.strerror})"
    tail = text.splitlines()[-lines:]
    return "\n".join("    " + line for line in tail) if tail else "    (log is empty)"


# SIGINT, SIGTERM and SIGHUP become KeyboardInterrupt, so that `up` and `start` tear
# down what they made; inside deferred_interrupts() one waits for the end of the block
# (not by blocking the signals: the node processes would inherit the mask)
_deferring = False
_deferred: int | None = None


def _interrupt(signum: int, frame: object) -> None:
    global _deferred
    if _deferring:
        _deferred = signum
        return
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def deferred_interrupts() -> Iterator[None]:
    global _deferring, _deferred
    _deferring = True
    try:
        yield
    finally:
        _deferring = False
        signum, _deferred = _deferred, None
        if signum is not None:
            raise KeyboardInterrupt(f"signal {signum}")


# ----------------------------------------------------------------------------
# DIR and its record


class Cluster:
    """DIR and DIR/devcluster.json."""

    def __init__(self, directory: str) -> None:
        self.dir = os.path.realpath(directory)
        self.state_path = os.path.join(self.dir, STATE_FILE)
        self.state: dict[str, Any] = {}

    # -- the record

    def exists(self) -> bool:
        return os.path.exists(self.state_path)

    def load(self) -> Cluster:
        if not os.path.isdir(self.dir):
            raise BadInput(f"--dir {self.dir}: no such directory")
        try:
            with open(self.state_path) as f:
                state = json.load(f)
        except FileNotFoundError:
            raise BadInput(f"--dir {self.dir}: no devcluster here (no {STATE_FILE}; "
                           f"make one with `devcluster up`)") from None
        except (OSError, ValueError) as exc:
            raise Failure(f"{self.state_path}: unreadable: {exc}") from None
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise Failure(f"{self.state_path}: not a devcluster record of version "
                          f"{STATE_VERSION}")
        self.state = state
        return self

    def save(self) -> None:
        tmp = self.state_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.state, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.state_path)

    def forget(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.state_path)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """One changing devcluster command per DIR at a time."""
        fd = os.open(os.path.join(self.dir, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise Failure(f"another devcluster command is working on {self.dir}") from None
            yield
        finally:
            os.close(fd)

    # -- nodes

    def nodes(self) -> list[dict[str, Any]]:
        return [self.state["nodes"][k] for k in sorted(self.state["nodes"], key=int)]

    def node(self, node_id: int) -> dict[str, Any]:
        ids = sorted(int(k) for k in self.state["nodes"])
        if node_id not in ids:
            known = f"nodes {ids[0]}..{ids[-1]}" if ids else "it has no nodes"
            raise BadInput(f"node {node_id}: no such node in {self.dir} ({known})")
        return self.state["nodes"][str(node_id)]

    def path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def spawn(self, node: dict[str, Any], restart: bool = False) -> subprocess.Popen:
        """Start node's mount process in its own session, output appended to its log.
        An interrupt waits until the process is in the record, so teardown finds it."""
        with deferred_interrupts(), open(node["log"], "ab") as log:
            if restart:
                log.write(f"---- devcluster: node {node['id']} restarted at "
                          f"{time.strftime('%Y-%m-%d %H:%M:%S')} ----\n".encode())
                log.flush()
            node["log_offset"] = log.tell()
            proc = subprocess.Popen(node["argv"], stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, env=child_env(),
                                    start_new_session=True)
            node["pid"] = proc.pid
            node["start_time"] = start_time(proc.pid)
            self.save()
        return proc

    def wait_mounted(self, procs: dict[int, subprocess.Popen], timeout: float,
                     started: float) -> None:
        """Until every node in procs is mounted; prints one line per node as it comes up.
        Failure (after printing the log tail) if one exits or the time runs out."""
        pending = dict(procs)
        deadline = started + timeout
        while pending:
            for node_id, proc in list(pending.items()):
                node = self.node(node_id)
                if mount_fstype(node["mountpoint"]) is not None:
                    print(f"node {node_id} mounted at {node['mountpoint']} (pid {proc.pid}) "
                          f"in {time.monotonic() - started:.1f} s", flush=True)
                    del pending[node_id]
                elif proc.poll() is not None:
                    print(f"node {node_id} (pid {proc.pid}) exited with status "
                          f"{proc.returncode} before its mount was live; "
                          f"{node['log']} ends:\n"
                          f"{log_tail(node['log'], node.get('log_offset', 0))}",
                          file=sys.stderr, flush=True)
                    raise Failure(f"node {node_id} did not start")
            if pending and time.monotonic() > deadline:
                for node_id in pending:
                    node = self.node(node_id)
                    print(f"node {node_id} (pid {pending[node_id].pid}) not mounted after "
                          f"{timeout:.0f} s; {node['log']} ends:\n"
                          f"{log_tail(node['log'], node.get('log_offset', 0))}",
                          file=sys.stderr, flush=True)
                raise Failure(f"node(s) {', '.join(map(str, pending))} not mounted after "
                              f"{timeout:.0f} s")
            time.sleep(0.05)


# ----------------------------------------------------------------------------
# up


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+)\s*([kmgtKMGT]?)(i?[bB])?\s*", text)
    if not m:
        raise BadInput(f"--size {text}: not a size (e.g. 2G, 512M)")
    size = int(m.group(1)) << (10 * " KMGT".index(m.group(2).upper() or " "))
    if size < MIN_SIZE:
        raise BadInput(f"--size {text}: at least {MIN_SIZE >> 20}M")
    return size


def human_size(size: int) -> str:
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20)):
        if size >= 1 << shift:
            return f"{size / (1 << shift):.4g} {unit}"
    return f"{size} bytes"


def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on 127.0.0.1 (bound to port 0, all held until all are
    chosen, then released for the nodes)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(s)
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def cluster_toml(ports: list[int], heartbeat: float = 0.5, failure: float = 3.0,
                 fencing_device: str | None = None, group: list[int] | None = None,
                 io_timeout: float | None = None) -> str:
    """The config: the nodes; with fencing_device a scsi-pr [fencing] table on it; with
    group a [storage] table (those nodes serve, on ports after the nodes' own)."""
    out = [f'name = "{CLUSTER_NAME}"', 'key_file = "cluster.key"', "",
           "[timeouts]", f"heartbeat_interval = {heartbeat}", f"failure_timeout = {failure}"]
    for node_id, port in enumerate(ports[:len(ports) - len(group or [])], 1):
        out += ["", "[[node]]", f"id = {node_id}", f'name = "node{node_id}"',
                f'address = "127.0.0.1:{port}"']
    if fencing_device is not None:
        out += ["", "[fencing]", 'agent = "scsi-pr"', f'devices = ["{fencing_device}"]']
    if group:
        server_ports = ports[len(ports) - len(group):]
        out += ["", "[storage]", f"group = {sorted(group)}"]
        if io_timeout is not None:
            out.append(f"io_timeout = {io_timeout}")
        out += ["", "[storage.servers]"]
        out += [f'{n} = "127.0.0.1:{p}"' for n, p in zip(sorted(group), server_ports,
                                                          strict=True)]
    return "\n".join(out) + "\n"


def parse_group(text: str | None, nodes: int) -> list[int]:
    """--storage-group 1,2 -> [1, 2]; BadInput unless they are nodes and leave one out."""
    if not text:
        return []
    try:
        group = sorted({int(x) for x in text.split(",")})
    except ValueError:
        raise BadInput(f"--storage-group {text}: not a list of node numbers") from None
    if not all(1 <= n <= nodes for n in group) or len(group) >= nodes:
        raise BadInput(f"--storage-group {text}: node numbers of 1..{nodes}, leaving at "
                       f"least one node to mount through them")
    return group


def check_machine() -> None:
    if os.geteuid() != 0:
        raise Failure("needs root (losetup, FUSE mounts)")
    for tool in ("losetup", "fusermount3", "umount"):
        if shutil.which(tool) is None:
            raise Failure(f"{tool} not installed")
    if not os.path.exists("/dev/fuse"):
        raise Failure("/dev/fuse missing")


def refuse_busy_dir(cl: Cluster) -> None:
    """up must not overwrite a cluster, or anything of one still attached or mounted."""
    if cl.exists():
        try:
            cl.load()
        except (Failure, BadInput):
            raise Failure(f"{cl.dir} holds a devcluster record ({STATE_FILE}) that cannot "
                          f"be read; remove it once nothing of that cluster runs") from None
        alive = [n["id"] for n in cl.nodes() if node_alive(n)]
        if alive:
            raise Failure(f"{cl.dir} holds a running cluster (node(s) "
                          f"{', '.join(map(str, alive))} alive); `devcluster down --dir "
                          f"{cl.dir}` first")
        raise Failure(f"{cl.dir} holds the record of an earlier cluster; `devcluster down "
                      f"--dir {cl.dir}` first (it cleans up what is left of it)")
    backing = cl.path("disk.img")
    if loops := loops_over(backing):
        raise Failure(f"{backing} is attached to {', '.join(loops)}; detach it first")
    for name in sorted(os.listdir(cl.dir)):
        mp = cl.path(name)
        if re.fullmatch(r"node\d+", name) and mount_fstype(mp) is not None:
            raise Failure(f"{mp} is mounted; unmount it first")


def cmd_up(args: argparse.Namespace) -> int:
    if not 1 <= args.nodes <= MAX_NODES:
        raise BadInput(f"--nodes {args.nodes}: must be 1..{MAX_NODES}")
    journals = args.nodes if args.journals is None else args.journals
    if journals < args.nodes:
        raise BadInput(f"--journals {journals}: fewer than --nodes {args.nodes} (every "
                       f"node needs its own journal)")
    size = parse_size(args.size)
    if args.timeout <= 0:
        raise BadInput(f"--timeout {args.timeout}: must be positive")
    if not 0 < args.heartbeat_interval <= args.failure_timeout / 2:
        raise BadInput(f"--heartbeat-interval {args.heartbeat_interval}, --failure-timeout "
                       f"{args.failure_timeout}: need 0 < heartbeat <= failure timeout / 2")
    if args.fencing == "scsi-pr" and not (args.device or "").startswith("iscsi://"):
        raise BadInput("--fencing scsi-pr: needs --device iscsi://... (a LUN)")
    parse_group(args.storage_group, args.nodes)
    check_machine()
    cmd = clusterfs_command()
    options = mount_options(cmd)
    if "--config" not in options:
        raise Failure("this clusterfs's `mount` has no --config option: it cannot join a "
                      "cluster yet")
    os.makedirs(args.dir, exist_ok=True)
    cl = Cluster(args.dir)
    with cl.locked():
        refuse_busy_dir(cl)
        return _up(cl, args, cmd, options, journals, size)


def _attach(cl: Cluster, args: argparse.Namespace, size: int) -> str:
    """The device the cluster runs on: --device as given, or a loop device over a new
    DIR/disk.img. In the record before anything else is made."""
    backing = cl.path("disk.img")
    if args.device:
        with deferred_interrupts():
            cl.state["loop"], cl.state["backing"], cl.state["external"] = (
                args.device, None, True)
            cl.save()
        print(f"device {args.device} (given; left as it is at the end)", flush=True)
        return args.device
    with open(backing, "wb") as f:
        f.truncate(size)
    with deferred_interrupts():     # the loop device is in the record before anything else
        r = subprocess.run(["losetup", "-f", "--show", backing], capture_output=True,
                           text=True)
        if r.returncode != 0:
            raise Failure(f"losetup -f --show {backing}: {last_line(r)}")
        loop = r.stdout.strip()
        cl.state["loop"], cl.state["backing"] = loop, os.path.realpath(backing)
        cl.save()
    print(f"loop device {loop} over {backing} ({human_size(size)}, sparse)", flush=True)
    return loop


def _up(cl: Cluster, args: argparse.Namespace, cmd: list[str], options: set[str],
        journals: int, size: int) -> int:
    for name in ("disk.img", "cluster.key", "cluster.toml"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(cl.path(name))
    for name in ("fence", "state", "control"):
        shutil.rmtree(cl.path(name), ignore_errors=True)
    group = parse_group(args.storage_group, args.nodes)
    cl.state = {"version": STATE_VERSION, "dir": cl.dir, "backing": None, "loop": None,
                "size": size, "journals": journals, "config": cl.path("cluster.toml"),
                "key": cl.path("cluster.key"), "clusterfs": cmd, "nodes": {},
                "fencing": args.fencing, "storage_group": group,
                "mount_options": args.mount_options}
    loop = _attach(cl, args, size)
    procs: dict[int, subprocess.Popen] = {}
    try:
        r = run_clusterfs(cmd, "keygen", "-o", cl.state["key"], timeout=60)
        if r.returncode != 0:
            raise Failure(f"clusterfs keygen: {last_line(r)}")
        with open(cl.state["config"], "w") as f:
            f.write(cluster_toml(free_ports(args.nodes + len(group)), args.heartbeat_interval,
                                 args.failure_timeout,
                                 loop if args.fencing == "scsi-pr" else None, group,
                                 args.io_timeout))
        r = run_clusterfs(cmd, "mkfs", "-q", "-j", str(journals), "--cluster", CLUSTER_NAME,
                          loop, timeout=600)
        if r.returncode != 0:
            raise Failure(f"mkfs.clusterfs -j {journals} --cluster {CLUSTER_NAME} {loop}: "
                          f"{last_line(r)}")
        print(f"formatted {loop}: {journals} journals, cluster {CLUSTER_NAME!r}; "
              f"config {cl.state['config']}", flush=True)
        for node_id in range(1, args.nodes + 1):
            node = new_node(cl, node_id, options)
            cl.state["nodes"][str(node_id)] = node
        # the storage group's nodes first: the others mount through their block servers
        waves = [[n for n in cl.nodes() if n["id"] in group],
                 [n for n in cl.nodes() if n["id"] not in group]]
        for wave in filter(None, waves):
            started = time.monotonic()
            for node in wave:
                procs[node["id"]] = cl.spawn(node)
            print(f"started {len(wave)} node(s) (pids "
                  f"{' '.join(str(procs[n['id']].pid) for n in wave)}); waiting for their "
                  f"mounts", flush=True)
            cl.wait_mounted({n["id"]: procs[n["id"]] for n in wave}, args.timeout, started)
    except BaseException as exc:
        why = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
        print(f"devcluster up {why}; tearing down what it made", file=sys.stderr, flush=True)
        problems = teardown(cl, timeout=30, fsck=False)
        for p in procs.values():        # ours: reap them
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(1)
        for line in problems:
            print(f"devcluster: {line}", file=sys.stderr)
        raise
    print(f"cluster up: {args.nodes} node(s) on {loop}; `devcluster status --dir {cl.dir}`")
    return 0


def new_node(cl: Cluster, node_id: int, options: set[str]) -> dict[str, Any]:
    mp = cl.path(f"node{node_id}")
    os.makedirs(mp, exist_ok=True)
    fence, state = cl.path("fence"), cl.path("state")
    os.makedirs(fence, exist_ok=True)
    os.makedirs(state, exist_ok=True)
    argv = [*cl.state["clusterfs"], "mount", "-f", "--config", cl.state["config"],
            "--node-id", str(node_id), "--state-dir", state]
    if cl.state.get("fencing", "process") == "process":
        argv += ["--fence-pid-dir", fence]       # else: the config's agent
    control = None
    if "--control" in options:
        # a socket of our own, so two dev clusters on one machine do not meet
        # at the default /run/clusterfs/lockd-K.sock
        os.makedirs(cl.path("control"), exist_ok=True)
        control = cl.path(f"control/node{node_id}.sock")
        if len(os.fsencode(control)) >= SUN_PATH_MAX:
            raise Failure(f"{control}: too long for a unix socket ({SUN_PATH_MAX - 1} bytes "
                          f"at most); use a shorter --dir")
        argv += ["--control", control]
    if cl.state.get("mount_options"):
        argv += ["-o", cl.state["mount_options"]]
    argv += [cl.state["loop"], mp]
    log = cl.path(f"node{node_id}.log")
    open(log, "wb").close()
    return {"id": node_id, "mountpoint": mp, "log": log, "control": control, "argv": argv,
            "pid": None, "start_time": None}


# ----------------------------------------------------------------------------
# down / teardown


def unmount_command(cl: Cluster, mountpoint: str, timeout: float) -> list[str]:
    """`clusterfs umount` of one node: it unmounts and waits for that node's process.
    Teardown starts it for every node at once, so that no node is left to unmount alone,
    without quorum, after the others have gone."""
    return [*cl.state["clusterfs"], "umount", "--timeout", str(int(timeout)), mountpoint]


def teardown(cl: Cluster, timeout: float, fsck: bool) -> list[str]:
    """Stop every node of ours, detach our mounts and the loop device; the record goes
    once nothing of ours is left. Returns what could not be done (empty: all clean)."""
    problems: list[str] = []
    nodes = cl.nodes()
    live = [n for n in nodes if node_alive(n)]

    # 1. a clean unmount of every live, mounted node, all at once, each node then
    #    writing back, marking its journal clean and leaving (see unmount_command). A
    #    live node not mounted (still starting) gets SIGTERM, which stops it as cleanly.
    umounts: dict[int, tuple[subprocess.Popen, IO[str]]] = {}
    for n in live:
        if mount_fstype(n["mountpoint"]) is None:
            print(f"node {n['id']} (pid {n['pid']}) not mounted: SIGTERM", flush=True)
            with contextlib.suppress(ProcessLookupError):
                os.kill(n["pid"], signal.SIGTERM)
        else:
            argv = unmount_command(cl, n["mountpoint"], timeout)
            print(f"node {n['id']}: clusterfs umount {n['mountpoint']}", flush=True)
            out = tempfile.TemporaryFile("w+")   # noqa: SIM115 - closed below
            umounts[n["id"]] = (subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                env=child_env()), out)

    # 2. every node process gone: waited for until the timeout, then SIGTERM (a clean
    #    unmount too), then SIGKILL, to all stuck nodes at once; only while the pid
    #    still names the process we started
    stuck = wait_all_gone(live, time.monotonic() + timeout)
    for n in live:
        if n not in stuck:
            print(f"node {n['id']} (pid {n['pid']}) exited", flush=True)
    if stuck:
        for n in stuck:
            print(f"node {n['id']} (pid {n['pid']}) still running after {timeout:.0f} s: "
                  f"SIGTERM", flush=True)
            with contextlib.suppress(ProcessLookupError):
                os.kill(n["pid"], signal.SIGTERM)
        deaf = wait_all_gone(stuck, time.monotonic() + min(10.0, timeout))
        problems += [f"node {n['id']} (pid {n['pid']}) did not unmount in {timeout:.0f} s; "
                     f"exited on SIGTERM" for n in stuck if n not in deaf]
        for n in deaf:
            print(f"node {n['id']} (pid {n['pid']}) ignored SIGTERM: SIGKILL", flush=True)
            with contextlib.suppress(ProcessLookupError):
                os.kill(n["pid"], signal.SIGKILL)
        immortal = wait_all_gone(deaf, time.monotonic() + 10)
        for n in deaf:
            if n in immortal:
                problems.append(f"node {n['id']} (pid {n['pid']}) survives SIGKILL; left "
                                f"running")
            else:
                problems.append(f"node {n['id']} (pid {n['pid']}) did not exit on unmount or "
                                f"SIGTERM; killed with SIGKILL (its journal needs replay)")

    # 3. the unmount commands: done once their nodes are gone (one blocked in the kernel
    #    on a hung mount is released when that mount's server dies)
    for node_id, (p, out) in umounts.items():
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            p.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(5)
        out.seek(0)
        said = out.read().strip()
        out.close()
        if p.returncode is None:
            problems.append(f"node {node_id}: clusterfs umount (pid {p.pid}) is stuck; left "
                            f"behind")
        elif p.returncode != 0:
            last = said.splitlines()[-1] if said else f"exit status {p.returncode}"
            problems.append(f"node {node_id}: clusterfs umount failed: {last}")
    left_running = [n for n in nodes if node_alive(n)]

    # 3. leftover mounts of ours (a killed node's dead FUSE mount), lazily
    for n in nodes:
        if mount_fstype(n["mountpoint"]) is None:
            continue
        if n in left_running:
            problems.append(f"{n['mountpoint']} left mounted: its node still runs")
        elif detach_mount(n["mountpoint"]):
            print(f"detached the leftover mount {n['mountpoint']}", flush=True)
        else:
            problems.append(f"{n['mountpoint']}: could not detach the leftover mount")

    # 4. fsck, with nothing of ours running on the device
    loop, backing = cl.state["loop"], cl.state["backing"]
    external = cl.state.get("external", False)
    ours = external or (loop is not None and loop_backing(loop) == backing)
    if fsck:
        if left_running:
            problems.append("fsck skipped: a node still runs")
        elif not ours:
            problems.append(f"fsck skipped: {loop} no longer serves {backing}")
        else:
            problems += run_fsck(cl.state["clusterfs"], loop)

    # 5. the loop device, only while it still serves our file
    if external or loop is None:
        pass                        # a device we were given, or none was attached yet
    elif not ours:
        print(f"{loop} no longer serves {backing}; left alone", flush=True)
    elif left_running:
        problems.append(f"{loop} left attached: a node still has it open")
    elif why := detach_loop(loop, backing):
        problems.append(why)
    else:
        print(f"detached {loop}", flush=True)

    still = left_running or any(mount_fstype(n["mountpoint"]) for n in nodes) or (
        not external and loop is not None and loop_backing(loop) == backing)
    if still:
        problems.append(f"{STATE_FILE} kept: `down` again once the above is fixed")
    else:
        cl.forget()
    return problems


def run_fsck(cmd: list[str], loop: str) -> list[str]:
    print(f"fsck.clusterfs {loop}", flush=True)
    try:
        r = run_clusterfs(cmd, "fsck", loop, timeout=1800)
    except Failure as exc:
        return [f"fsck: {exc}"]
    text = (r.stdout + r.stderr).rstrip()
    if text:
        print("\n".join("    " + line for line in text.splitlines()), flush=True)
    if r.returncode == 0:
        print("fsck: clean", flush=True)
        return []
    return [f"fsck.clusterfs {loop} exited {r.returncode} (not clean)"]


def cmd_down(args: argparse.Namespace) -> int:
    if args.timeout <= 0:
        raise BadInput(f"--timeout {args.timeout}: must be positive")
    cl = Cluster(args.dir).load()
    with cl.locked():
        cl.load()
        problems = teardown(cl, args.timeout, args.fsck)
    for line in problems:
        print(f"devcluster down: {line}", file=sys.stderr)
    if problems:
        return EXIT_FAIL
    print(f"cluster in {cl.dir} is down (logs and disk.img kept)")
    return 0


# ----------------------------------------------------------------------------
# status, kill, start


def cmd_status(args: argparse.Namespace) -> int:
    cl = Cluster(args.dir).load()
    print(f"cluster {cl.dir}: loop {cl.state['loop']}"
          + ("" if cl.state.get("external")
             or loop_backing(cl.state["loop"]) == cl.state["backing"]
             else " (DETACHED or no longer ours)")
          + f", config {cl.state['config']}")
    healthy = True
    live = []
    for n in cl.nodes():
        alive = node_alive(n)
        fstype = mount_fstype(n["mountpoint"])
        if alive and fstype:
            live.append(n)
        healthy &= alive and fstype is not None
        mounted = "mounted" if fstype else "not mounted"
        if fstype and not alive:
            mounted = "mounted (dead: its server is gone)"
        print(f"node {n['id']}  pid {n['pid']}  {'alive' if alive else 'DEAD'}  "
              f"{mounted}  {n['mountpoint']}", flush=True)
    for n in live:
        ask = (["--control", n["control"]] if n.get("control")
               else ["--config", cl.state["config"], "--node-id", str(n["id"])])
        print(f"node {n['id']}: clusterfs status {' '.join(ask)}", flush=True)
        try:
            r = run_clusterfs(cl.state["clusterfs"], "status", *ask, timeout=STATUS_TIMEOUT)
        except Failure as exc:
            print(f"    (no answer: {exc})", flush=True)
            continue
        if r.returncode == 0:
            print("\n".join("    " + line for line in r.stdout.rstrip().splitlines()),
                  flush=True)
        else:
            print(f"    (no answer: {last_line(r)})", flush=True)
    return 0 if healthy else EXIT_FAIL


def cmd_kill(args: argparse.Namespace) -> int:
    cl = Cluster(args.dir).load()
    with cl.locked():
        cl.load()
        n = cl.node(args.node)
        killed = False
        if node_alive(n):
            os.kill(n["pid"], signal.SIGKILL)
            abort_fuse(n["mountpoint"])     # its kernel mount dies with it (abort_fuse)
            if not wait_gone(n, 10):
                raise Failure(f"node {n['id']} (pid {n['pid']}) still there 10 s after "
                              f"SIGKILL")
            killed = True
            print(f"node {n['id']} killed (kill -9 pid {n['pid']})", flush=True)
        if mount_fstype(n["mountpoint"]) is not None:
            if not detach_mount(n["mountpoint"]):
                raise Failure(f"{n['mountpoint']}: could not detach the dead mount")
            print(f"detached its dead mount {n['mountpoint']}", flush=True)
    if not killed:
        raise Failure(f"node {n['id']} was not running (pid {n['pid']} is not its process)")
    return 0


def cmd_start(args: argparse.Namespace) -> int:
    if args.timeout <= 0:
        raise BadInput(f"--timeout {args.timeout}: must be positive")
    cl = Cluster(args.dir).load()
    with cl.locked():
        cl.load()
        nodes = [cl.node(k) for k in dict.fromkeys(args.node)]
        for n in nodes:
            if node_alive(n):
                raise Failure(f"node {n['id']} is already running (pid {n['pid']})")
        if not cl.state.get("external") and \
                loop_backing(cl.state["loop"]) != cl.state["backing"]:
            raise Failure(f"{cl.state['loop']} no longer serves {cl.state['backing']}; "
                          f"`down` and `up` again")
        for n in nodes:
            if mount_fstype(n["mountpoint"]) is not None:
                if not detach_mount(n["mountpoint"]):
                    raise Failure(f"{n['mountpoint']}: could not detach the dead mount")
                print(f"detached the dead mount {n['mountpoint']}", flush=True)
        started = time.monotonic()
        procs: dict[int, subprocess.Popen] = {}
        try:
            for n in nodes:
                procs[n["id"]] = cl.spawn(n, restart=True)
            cl.wait_mounted(procs, args.timeout, started)
        except BaseException:
            # those not mounted are stopped; those mounted stay (status shows them)
            for n in nodes:
                if n["id"] in procs and mount_fstype(n["mountpoint"]) is None:
                    stop_failed_start(n, procs[n["id"]])
            raise
    return 0


def stop_failed_start(n: dict[str, Any], proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    detach_mount(n["mountpoint"])


# ----------------------------------------------------------------------------
# command line


def node_id(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a node number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: node numbers start at 1")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="devcluster", description=__doc__.splitlines()[0],
        epilog="Exit status: 0 done, 1 failed (said on stderr), 2 bad input.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    up = sub.add_parser("up", help="make, format and mount an N-node cluster in DIR")
    up.add_argument("--nodes", type=int, default=3, help="node processes (default 3)")
    up.add_argument("--dir", required=True, help="where everything goes (made if missing)")
    up.add_argument("--size", default="2G", help="size of DIR/disk.img (sparse; default 2G)")
    up.add_argument("--journals", type=int, help="journals = node slots (default: --nodes)")
    up.add_argument("--timeout", type=float, default=120.0,
                    help="seconds to wait for every mount (default 120)")
    up.add_argument("--heartbeat-interval", type=float, default=0.5, metavar="S",
                    help="the config's heartbeat_interval (default 0.5)")
    up.add_argument("--failure-timeout", type=float, default=3.0, metavar="S",
                    help="the config's failure_timeout: a silent node leaves the view "
                         "after this (default 3.0)")
    up.add_argument("--device", metavar="DEV",
                    help="use DEV (a block device or iscsi:// URL) instead of a loop device "
                         "over DIR/disk.img (--size is then ignored)")
    up.add_argument("--fencing", choices=("process", "scsi-pr"), default="process",
                    help="process: kill -9 of a dead node's process (default); scsi-pr: "
                         "SCSI-3 reservations on the --device LUN")
    up.add_argument("--storage-group", metavar="IDS",
                    help="e.g. 1,2: those nodes serve the disk, the others mount through "
                         "them (proxy I/O)")
    up.add_argument("--io-timeout", type=float, metavar="S",
                    help="the config's storage io_timeout (with --storage-group)")
    up.add_argument("--mount-options", metavar="OPTS",
                    help="clusterfs mount -o OPTS for every node (e.g. max_glocks=5000)")
    up.set_defaults(run=cmd_up)

    st = sub.add_parser("status", help="each node: pid, alive, mounted, clusterfs status; "
                                       "exit 0 only if all are alive and mounted")
    st.add_argument("--dir", required=True)
    st.set_defaults(run=cmd_status)

    kill = sub.add_parser("kill", help="kill -9 node K and detach its dead mount")
    kill.add_argument("node", type=node_id, metavar="K")
    kill.add_argument("--dir", required=True)
    kill.set_defaults(run=cmd_kill)

    start = sub.add_parser("start", help="restart node(s) K (as up started them) and wait "
                                         "for their mounts; give several to restart nodes "
                                         "that need each other for quorum")
    start.add_argument("node", type=node_id, metavar="K", nargs="+")
    start.add_argument("--dir", required=True)
    start.add_argument("--timeout", type=float, default=120.0,
                       help="seconds to wait for the mount (default 120)")
    start.set_defaults(run=cmd_start)

    down = sub.add_parser("down", help="unmount every node, stop them, detach the loop "
                                       "device")
    down.add_argument("--dir", required=True)
    down.add_argument("--fsck", action="store_true",
                      help="check the device once every node is gone (exit 1 unless clean)")
    down.add_argument("--timeout", type=float, default=60.0,
                      help="seconds for the clean unmounts before SIGTERM, then SIGKILL "
                           "(default 60)")
    down.set_defaults(run=cmd_down)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    try:
        return args.run(args)
    except BadInput as exc:
        print(f"devcluster {args.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except Failure as exc:
        print(f"devcluster {args.command}: {exc}", file=sys.stderr)
        return EXIT_FAIL
    except KeyboardInterrupt:
        print(f"devcluster {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:                 # `devcluster status | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAIL
    except OSError as exc:
        print(f"devcluster {args.command}: {exc}", file=sys.stderr)
        return EXIT_FAIL
