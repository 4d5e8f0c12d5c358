"""tools/devcluster: a local N-node cluster on one loop device, driven as a user would.

Three tiers:

- bad input: one line on stderr, exit 2, nothing made (no root needed);
- lifecycle on a stand-in mount (tests/devcluster_fake.py: the cluster mount's
  command line, nullfs behind it): up, status, kill -9, start, down, and the
  failures in between (a node that will not start, one that never mounts, one
  stuck on unmount), each ending with nothing of ours left: no process, no
  mount, no loop device;
- the real cluster mount: three `clusterfs mount --config --node-id` processes
  on one device, a file written on one node read on another, kill -9, restart,
  down with fsck. These need `clusterfs mount` to join clusters and are skipped
  (with that reason) while its --help has no --config.

Every test works in its own /tmp/devcl-* directory; its teardown runs `devcluster
down` and then, not trusting the tool, kills any process whose command line
names the directory, lazily unmounts anything mounted below it and detaches any
loop device over its disk.img.
"""

from __future__ import annotations

import contextlib
import functools
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

import pytest
from mountutil import MOUNT_TIMEOUT, require_mounts

ROOT = Path(__file__).resolve().parent.parent
DEVCLUSTER = str(ROOT / "tools" / "devcluster")
FAKE = f"{sys.executable} {ROOT / 'tests' / 'devcluster_fake.py'}"
UP_TIMEOUT = str(int(max(MOUNT_TIMEOUT, 120)))


def devcluster(*args: str, env: dict[str, str] | None = None,
               timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, DEVCLUSTER, *args], capture_output=True,
                          text=True, timeout=timeout, env=env, stdin=subprocess.DEVNULL)


def fake_env(**faults: str) -> dict[str, str]:
    env = dict(os.environ, DEVCLUSTER_CLUSTERFS=FAKE)
    env.update({f"DEVCLUSTER_FAKE_{k.upper()}": v for k, v in faults.items()})
    return env


def real_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("DEVCLUSTER_CLUSTERFS", None)
    return env


@functools.cache
def cluster_mount_missing() -> str | None:
    """Why the real tests cannot run yet: this checkout's `clusterfs mount` has no --config."""
    r = subprocess.run([sys.executable, "-m", "clusterfs.cli", "mount", "--help"],
                       capture_output=True, text=True, timeout=60, cwd=ROOT)
    if r.returncode != 0:
        return f"`clusterfs mount --help` fails ({r.returncode}): {r.stderr.strip()}"
    if "--config" not in r.stdout:
        return ("`clusterfs mount` cannot join a cluster yet (its --help has no --config); "
                "these run once it can")
    return None


def stopped_gently(r: subprocess.CompletedProcess[str]) -> None:
    """The teardown stopped every node with an unmount or one SIGTERM, none needed more."""
    out = r.stdout + r.stderr
    assert "still running" not in out and "SIGKILL" not in out, out


def one_line_error(r: subprocess.CompletedProcess[str], code: int, *words: str) -> None:
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr + r.stdout, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])


# ----------------------------------------------------------------------------
# what is left of a cluster, judged without the tool


_OCTAL = re.compile(r"\\([0-7]{3})")


def _procs_naming(directory: str) -> list[int]:
    me = os.getpid()
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        if int(pid) == me:
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                args = f.read().decode(errors="replace").split("\0")
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    continue
        except (OSError, IndexError):
            continue
        if any(a == directory or a.startswith(directory + "/") for a in args):
            found.append(int(pid))
    return found


def _mounts_under(directory: str) -> list[str]:
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mp = _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), line.split()[4])
            if mp == directory or mp.startswith(directory + "/"):
                found.append(mp)
    return found


def _loops_over(backing: str) -> list[str]:
    r = subprocess.run(["losetup", "-j", backing, "-n", "-O", "NAME"],
                       capture_output=True, text=True)
    return r.stdout.split()


def leftovers(directory: str) -> list[str]:
    """Processes, mounts and loop devices of the cluster in `directory` still there."""
    return ([f"process {pid}" for pid in _procs_naming(directory)]
            + [f"mount {mp}" for mp in _mounts_under(directory)]
            + [f"loop device {dev}" for dev in _loops_over(os.path.join(directory,
                                                                         "disk.img"))])


def _sweep(directory: str) -> list[str]:
    found = leftovers(directory)
    for pid in _procs_naming(directory):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while _procs_naming(directory) and time.monotonic() < deadline:
        time.sleep(0.05)
    for mp in reversed(_mounts_under(directory)):
        subprocess.run(["umount", "-l", mp], capture_output=True)
    for dev in _loops_over(os.path.join(directory, "disk.img")):
        for _ in range(50):
            if subprocess.run(["losetup", "-d", dev], capture_output=True).returncode == 0:
                break
            time.sleep(0.1)
    return found


@pytest.fixture
def devdir():
    """A fresh /tmp/devcl-* path for a cluster (not made yet); everything in it torn
    down afterwards, by `devcluster down` and then by force."""
    parent = tempfile.mkdtemp(prefix="devcl-", dir="/tmp")
    directory = os.path.join(parent, "cluster")
    try:
        yield directory
    finally:
        if os.path.exists(os.path.join(directory, "devcluster.json")):
            with contextlib.suppress(subprocess.TimeoutExpired):
                devcluster("down", "--dir", directory, "--timeout", "20", timeout=120)
        left = _sweep(directory)
        shutil.rmtree(parent, ignore_errors=True)
        if left:
            print(f"test_devcluster: swept up leftovers: {', '.join(left)}", file=sys.stderr)


def live_nodes(directory: str) -> list[int]:
    with open(os.path.join(directory, "devcluster.json")) as f:
        state = json.load(f)
    return sorted(int(k) for k, n in state["nodes"].items()
                  if n["pid"] in _procs_naming(directory))


def status_lines(r: subprocess.CompletedProcess[str]) -> dict[int, str]:
    return {int(m.group(1)): m.group(0) for m in re.finditer(r"^node (\d+)  pid .*$",
                                                             r.stdout, re.MULTILINE)}


# ----------------------------------------------------------------------------
# bad input


def test_help_names_every_subcommand():
    r = devcluster("--help")
    assert r.returncode == 0, r.stderr
    for sub in ("up", "status", "kill", "start", "down"):
        assert re.search(rf"^\s+{sub}\s", r.stdout, re.MULTILINE), sub
    r = devcluster()
    assert r.returncode == 2 and "Traceback" not in r.stderr


@pytest.mark.parametrize("args", [["status"], ["kill", "1"], ["start", "1"], ["down"],
                                  ["down", "--fsck"]])
def test_unknown_dir_is_one_line(args, tmp_path):
    missing = str(tmp_path / "nothing-here")
    one_line_error(devcluster(*args, "--dir", missing), 2, "no such directory", missing)
    assert not os.path.exists(missing)


@pytest.mark.parametrize("args", [["status"], ["kill", "2"], ["start", "2"], ["down"]])
def test_dir_without_a_cluster_is_one_line(args, tmp_path):
    one_line_error(devcluster(*args, "--dir", str(tmp_path)), 2, "no devcluster here")
    assert os.listdir(tmp_path) == []


def _hand_made_record(directory: Path, nodes: int = 3) -> None:
    state = {"version": 1, "dir": str(directory), "backing": str(directory / "disk.img"),
             "loop": "/dev/loop-none", "config": str(directory / "cluster.toml"),
             "clusterfs": ["false"],
             "nodes": {str(k): {"id": k, "pid": None, "start_time": None,
                                "mountpoint": str(directory / f"node{k}"),
                                "log": str(directory / f"node{k}.log"), "argv": ["false"]}
                       for k in range(1, nodes + 1)}}
    (directory / "devcluster.json").write_text(json.dumps(state))


@pytest.mark.parametrize("args", [["kill", "4"], ["start", "4"], ["kill", "99"]])
def test_node_out_of_range_is_one_line(args, tmp_path):
    _hand_made_record(tmp_path)
    one_line_error(devcluster(*args, "--dir", str(tmp_path)), 2,
                   f"node {args[1]}: no such node", "nodes 1..3")


@pytest.mark.parametrize("node", ["0", "-1", "two", ""])
def test_bad_node_number_is_refused(node, tmp_path):
    _hand_made_record(tmp_path)
    r = devcluster("kill", node, "--dir", str(tmp_path))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "K" in r.stderr


def test_unreadable_record_is_one_line(tmp_path):
    (tmp_path / "devcluster.json").write_text("{ not json")
    one_line_error(devcluster("status", "--dir", str(tmp_path)), 1, "unreadable")
    (tmp_path / "devcluster.json").write_text('{"version": 99}')
    one_line_error(devcluster("down", "--dir", str(tmp_path)), 1, "not a devcluster record")


@pytest.mark.parametrize(("args", "words"), [
    (["--nodes", "0"], ["--nodes 0", "1..32"]),
    (["--nodes", "33"], ["--nodes 33"]),
    (["--nodes", "3", "--journals", "2"], ["--journals 2", "fewer than --nodes 3"]),
    (["--size", "12Q"], ["--size 12Q", "not a size"]),
    (["--size", "1M"], ["--size 1M", "at least"]),
    (["--timeout", "0"], ["--timeout"]),
    (["--failure-timeout", "0.8"], ["--heartbeat-interval 0.5", "--failure-timeout 0.8"]),
    (["--heartbeat-interval", "0"], ["--heartbeat-interval 0.0"]),
])
def test_up_bad_arguments_make_nothing(args, words, tmp_path):
    target = str(tmp_path / "cluster")
    one_line_error(devcluster("up", "--dir", target, *args, env=fake_env()), 2, *words)
    assert not os.path.exists(target)


def test_up_refuses_a_mount_that_cannot_join(devdir):
    """A clusterfs whose `mount` has no --config (today's single-node one): one line,
    nothing attached or started."""
    require_mounts()
    r = devcluster("up", "--dir", devdir, env=fake_env(old="1"))
    one_line_error(r, 1, "no --config")
    assert leftovers(devdir) == []


# ----------------------------------------------------------------------------
# lifecycle, on the stand-in mount


def test_fake_lifecycle_up_status_kill_start_down(devdir):
    require_mounts()
    env = fake_env()
    r = devcluster("up", "--nodes", "3", "--dir", devdir, "--size", "256M", env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    for k in (1, 2, 3):
        assert re.search(rf"^node {k} mounted at {devdir}/node{k} \(pid \d+\) in [\d.]+ s$",
                         r.stdout, re.MULTILINE), r.stdout
    assert live_nodes(devdir) == [1, 2, 3]
    assert sorted(_mounts_under(devdir)) == [f"{devdir}/node{k}" for k in (1, 2, 3)]
    toml = Path(devdir, "cluster.toml").read_text()
    assert 'name = "devcl"' in toml and toml.count("[[node]]") == 3

    r = devcluster("status", "--dir", devdir, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = status_lines(r)
    assert sorted(lines) == [1, 2, 3] and all("alive  mounted" in v for v in lines.values())
    assert r.stdout.count("fake status: --config") == 3      # each node's own answer

    one_line_error(devcluster("up", "--nodes", "3", "--dir", devdir, env=env), 1,
                   "holds a running cluster")

    r = devcluster("kill", "2", "--dir", devdir, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert live_nodes(devdir) == [1, 3]
    assert f"{devdir}/node2" not in _mounts_under(devdir)
    r = devcluster("status", "--dir", devdir, env=env)
    assert r.returncode == 1, r.stdout + r.stderr
    lines = status_lines(r)
    assert "DEAD  not mounted" in lines[2], lines
    assert "alive  mounted" in lines[1] and "alive  mounted" in lines[3], lines
    one_line_error(devcluster("kill", "2", "--dir", devdir, env=env), 1, "was not running")
    one_line_error(devcluster("kill", "4", "--dir", devdir, env=env), 2, "no such node")

    r = devcluster("start", "2", "--dir", devdir, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert re.search(rf"^node 2 mounted at {devdir}/node2", r.stdout, re.MULTILINE), r.stdout
    assert live_nodes(devdir) == [1, 2, 3]
    one_line_error(devcluster("start", "2", "--dir", devdir, env=env), 1, "already running")
    assert devcluster("status", "--dir", devdir, env=env).returncode == 0

    # several at once (nodes that need each other for quorum)
    for k in ("1", "3"):
        assert devcluster("kill", k, "--dir", devdir, env=env).returncode == 0
    assert live_nodes(devdir) == [2]
    r = devcluster("start", "3", "1", "3", "--dir", devdir, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert sorted(re.findall(r"^node (\d) mounted at", r.stdout, re.MULTILINE)) == ["1", "3"]
    assert live_nodes(devdir) == [1, 2, 3]
    # nodes that do not answer `clusterfs status`: said, and not held against them
    r = devcluster("status", "--dir", devdir, env=fake_env(mute="1"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("(no answer: clusterfs status: cannot reach") == 3, r.stdout

    r = devcluster("down", "--dir", devdir, "--fsck", env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "fsck: clean" in r.stdout
    assert leftovers(devdir) == []
    assert not os.path.exists(os.path.join(devdir, "devcluster.json"))
    one_line_error(devcluster("status", "--dir", devdir, env=env), 2, "no devcluster here")


def test_fake_node_that_fails_to_start_tears_everything_down(devdir):
    require_mounts()
    r = devcluster("up", "--nodes", "3", "--dir", devdir, "--size", "256M",
                   env=fake_env(fail="2"))
    assert r.returncode == 1, r.stdout + r.stderr
    assert "refuses to start (fault injected)" in r.stderr      # the log tail
    assert "devcluster up: node 2 did not start" in r.stderr
    assert "Traceback" not in r.stderr
    stopped_gently(r)
    assert leftovers(devdir) == []
    assert not os.path.exists(os.path.join(devdir, "devcluster.json"))


def test_fake_node_that_never_mounts_times_out_and_tears_down(devdir):
    require_mounts()
    r = devcluster("up", "--nodes", "3", "--dir", devdir, "--size", "256M",
                   "--timeout", "5", env=fake_env(slow="3"))
    assert r.returncode == 1, r.stdout + r.stderr
    assert "never mounts (fault injected)" in r.stderr
    assert "not mounted after 5 s" in r.stderr
    stopped_gently(r)
    assert leftovers(devdir) == []


def test_fake_up_interrupted_by_sigterm_tears_down(devdir):
    require_mounts()
    p = subprocess.Popen([sys.executable, DEVCLUSTER, "up", "--nodes", "3", "--dir", devdir,
                          "--size", "256M", "--timeout", "120"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=fake_env(slow="1"))
    try:
        # wait until it waits for the mounts (the other two are live), then stop it
        deadline = time.monotonic() + 60
        while len(_mounts_under(devdir)) < 2:
            assert p.poll() is None and time.monotonic() < deadline, p.communicate()
            time.sleep(0.1)
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode != 0 and "interrupted" in err, out + err
    assert "Traceback" not in err
    assert "still running" not in out + err and "SIGKILL" not in out + err, out + err
    assert leftovers(devdir) == []


def test_fake_down_kills_a_node_stuck_on_unmount_and_says_so(devdir):
    require_mounts()
    env = fake_env(stuck="3")
    r = devcluster("up", "--nodes", "3", "--dir", devdir, "--size", "256M", env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    r = devcluster("down", "--dir", devdir, "--timeout", "3", env=env)
    assert r.returncode == 1, r.stdout + r.stderr
    assert re.search(r"node 3 \(pid \d+\) did not exit .* SIGKILL", r.stderr), r.stderr
    assert "node 1" not in r.stderr and "node 2" not in r.stderr, r.stderr
    assert leftovers(devdir) == []


def test_fake_down_of_a_hung_node_does_not_hang(devdir):
    """A node that answers nothing and ignores SIGTERM, with a process stuck in the kernel
    on its mount (which keeps it busy): down kills the node, which frees the stuck
    process, and is done in its time, saying what it had to do."""
    require_mounts()
    env = fake_env(hung="2")
    r = devcluster("up", "--nodes", "3", "--dir", devdir, "--size", "256M", env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    victim = subprocess.Popen(["stat", f"{devdir}/node2/"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        assert victim.poll() is None            # stuck on the hung node
        t0 = time.monotonic()
        r = devcluster("down", "--dir", devdir, "--timeout", "3", env=env, timeout=120)
        assert time.monotonic() - t0 < 60
        assert victim.wait(10) != 0              # freed: its request was aborted
    finally:
        if victim.poll() is None:
            victim.kill()
    assert r.returncode == 1, r.stdout + r.stderr
    assert re.search(r"node 2 \(pid \d+\) did not exit .* SIGKILL", r.stderr), r.stderr
    assert "node 2: clusterfs umount failed" in r.stderr, r.stderr
    assert "node 1" not in r.stderr and "node 3" not in r.stderr, r.stderr
    assert leftovers(devdir) == []


def test_fake_down_after_a_kill_behind_its_back(devdir):
    """A node killed by someone else leaves a dead FUSE mount; start and down cope."""
    require_mounts()
    env = fake_env()
    r = devcluster("up", "--nodes", "3", "--dir", devdir, "--size", "256M", env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    with open(os.path.join(devdir, "devcluster.json")) as f:
        pid1 = json.load(f)["nodes"]["1"]["pid"]
    os.kill(pid1, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while live_nodes(devdir) != [2, 3]:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert f"{devdir}/node1" in _mounts_under(devdir)          # a dead mount
    r = devcluster("status", "--dir", devdir, env=env)
    assert r.returncode == 1 and "DEAD  mounted (dead" in status_lines(r)[1], r.stdout

    # a restart that fails says why and leaves the rest as it was
    r = devcluster("start", "1", "--dir", devdir, env=fake_env(fail="1"))
    assert r.returncode == 1 and "refuses to start" in r.stderr, r.stdout + r.stderr
    assert live_nodes(devdir) == [2, 3]

    r = devcluster("down", "--dir", devdir, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert leftovers(devdir) == []


# ----------------------------------------------------------------------------
# the real cluster mount


@pytest.fixture
def real_cluster(devdir):
    """`devcluster up --nodes 3` of the real clusterfs mount; torn down by devdir."""
    if why := cluster_mount_missing():
        pytest.skip(why)
    require_mounts()
    r = devcluster("up", "--nodes", "3", "--dir", devdir, "--size", "512M",
                   "--timeout", UP_TIMEOUT, env=real_env(), timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    return devdir


def _write(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def test_real_three_nodes_share_a_file_kill_one_and_go_down(real_cluster):
    d = real_cluster
    data = os.urandom(300_000)
    _write(f"{d}/node1/shared.bin", data)
    assert _read(f"{d}/node2/shared.bin") == data
    assert _read(f"{d}/node3/shared.bin") == data
    r = devcluster("status", "--dir", d, env=real_env())
    assert r.returncode == 0, r.stdout + r.stderr
    assert all("alive  mounted" in v for v in status_lines(r).values()), r.stdout
    assert "(no answer" not in r.stdout and r.stdout.count("members") == 3, r.stdout

    # node 2 writes (fsync'd) and dies; the survivors go on with its file
    last_words = os.urandom(200_000)
    _write(f"{d}/node2/last-words.bin", last_words)
    r = devcluster("kill", "2", "--dir", d, env=real_env())
    assert r.returncode == 0, r.stdout + r.stderr
    assert live_nodes(d) == [1, 3]
    r = devcluster("status", "--dir", d, env=real_env())
    assert r.returncode == 1, r.stdout + r.stderr
    assert "DEAD  not mounted" in status_lines(r)[2], r.stdout
    assert _read(f"{d}/node1/last-words.bin") == last_words
    assert _read(f"{d}/node3/last-words.bin") == last_words

    r = devcluster("down", "--dir", d, "--fsck", env=real_env(), timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "fsck: clean" in r.stdout
    assert leftovers(d) == []
    assert not os.path.exists(os.path.join(d, "devcluster.json"))


def test_real_restarted_node_sees_the_data_and_fsck_is_clean(real_cluster):
    d = real_cluster
    data = os.urandom(100_000)
    _write(f"{d}/node1/before.bin", data)
    r = devcluster("kill", "3", "--dir", d, env=real_env())
    assert r.returncode == 0, r.stdout + r.stderr
    r = devcluster("start", "3", "--dir", d, "--timeout", UP_TIMEOUT, env=real_env(),
                   timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert _read(f"{d}/node3/before.bin") == data
    _write(f"{d}/node3/after.bin", data[::-1])
    assert _read(f"{d}/node2/after.bin") == data[::-1]
    r = devcluster("down", "--dir", d, "--fsck", env=real_env(), timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "fsck: clean" in r.stdout
    assert leftovers(d) == []
