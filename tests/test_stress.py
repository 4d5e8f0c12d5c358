"""tools/stress, our fsstress: its op sequence is a function of the seed, a run on a
healthy filesystem ends with no failure, and each of its checkers (the private model,
the hang watchdog, verify, digest) catches what it is there to catch.

Most tests run on the host filesystem (pytest's tmp dir); test_clusterfs_mount runs
the tool on a real single-node clusterfs mount, verifies after a remount, and the
fixture's fsck must be clean.
"""

from __future__ import annotations

import errno
import io
import json
import os
import re
import subprocess
import sys
import threading

import pytest

TOOLS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools")
sys.path.insert(0, TOOLS)

import stresslib  # noqa: E402

STRESS = [sys.executable, os.path.join(TOOLS, "stress")]


def stress(*args, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*STRESS, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def ok_run(*args, timeout: float = 120) -> subprocess.CompletedProcess:
    """``stress run ARGS`` that must exit 0 with no failure."""
    r = stress("run", *args, "--progress", "1000", timeout=timeout)
    assert r.returncode == 0, r.stderr[-6000:]
    assert "stress: 0 failure(s)" in r.stderr, r.stderr[-6000:]
    return r


def table(stderr: str) -> dict[str, dict[str, int]]:
    """The per-op table of a run's summary: kind -> {done, ok, expected, unsupp, failed}."""
    cols = ("done", "ok", "expected", "unsupp", "failed")
    out = {}
    for line in stderr.splitlines():
        parts = line.split()
        if len(parts) == 6 and parts[0] in stresslib.OP_KINDS and parts[1].isdigit():
            out[parts[0]] = dict(zip(cols, map(int, parts[1:]), strict=True))
    return out


def expected_outcomes(stderr: str) -> dict[str, int]:
    m = re.search(r"expected outcomes \(P: private, S: shared/races\): (.*)", stderr)
    assert m, stderr
    return {k: int(v) for k, v in (x.split("=") for x in m.group(1).split() if "=" in x)}


def verify(log, root=None) -> subprocess.CompletedProcess:
    return stress("verify", "--log", log, *(["--root", root] if root else []))


def verify_counts(r: subprocess.CompletedProcess) -> tuple[int, int, int]:
    m = re.search(r"verify: \d+ paths: (\d+) ok, (\d+) dirty .*, (\d+) failed", r.stdout)
    assert m, r.stdout + r.stderr
    return int(m.group(1)), int(m.group(2)), int(m.group(3))


def digest(d) -> str:
    r = stress("digest", "--dir", d)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout.strip()


def last_records(log) -> dict[str, dict]:
    out = {}
    with open(log) as f:
        for line in f:
            rec = json.loads(line)
            if rec["t"] in ("fsync", "dirty"):
                out[rec["path"]] = rec
    return out


# ----------------------------------------------------------------------------
# the op sequence


def test_same_seed_same_sequence(tmp_path):
    a = stresslib.plan(7, 500)
    assert a == stresslib.plan(7, 500)
    assert a != stresslib.plan(8, 500)
    assert {op.kind for op in stresslib.plan(7, 3000)} == set(stresslib.OP_KINDS)
    assert {op.dom for op in a} == {"P", "S"}

    # two real runs on two different trees print the same first ops, and they are the
    # plan's: the sequence depends on the seed alone, not on outcomes
    printed = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        r = ok_run("--dir", tmp_path / name, "--seed", 7, "--ops", 60, "--procs", 2, "-v")
        printed.append({p: re.findall(rf"^stress\[p{p}\] op \d+: (.*)$", r.stderr, re.MULTILINE)
                        for p in (0, 1)})
    assert printed[0] == printed[1]
    assert printed[0][0] == [op.describe() for op in stresslib.plan(7, 20)]
    assert printed[0][1] == [op.describe() for op in stresslib.plan(8, 20)]   # seed S+1
    r = stress("plan", "--seed", 7, "--ops", 20, "--proc", 1)
    assert r.returncode == 0
    assert [ln.split(": ", 1)[1] for ln in r.stdout.splitlines()] == printed[0][1]


# ----------------------------------------------------------------------------
# runs on the host filesystem


def test_run_on_host_fs_then_verify(tmp_path):
    d, log = tmp_path / "tree", tmp_path / "stress.log"
    d.mkdir()
    r = ok_run("--dir", d, "--seed", 11, "--ops", 2000, "--log", log, "--fsync-at-end",
               "--check-every", 100)
    t = table(r.stderr)
    assert set(t) == set(stresslib.OP_KINDS)
    # the mix does real work: every kind succeeds somewhere, except that a filesystem
    # may not do punch/xattrs (then they are counted as unsupported, not as failures)
    for kind, c in t.items():
        assert c["failed"] == 0
        assert c["ok"] > 0 or c["unsupp"] > 0, (kind, c)
    assert t["read"]["ok"] > 50 and t["write"]["ok"] > 50
    v = verify(log)
    assert v.returncode == 0, v.stdout
    ok, _dirty, failed = verify_counts(v)
    assert failed == 0 and ok >= 10
    # verify takes another root: the same tree under another name checks the same
    moved = tmp_path / "moved"
    os.rename(d, moved)
    assert verify_counts(verify(log, moved))[0] == ok
    assert verify(log).returncode == 1          # and the old root is gone


def test_two_processes_one_shared_dir(tmp_path):
    d = tmp_path / "tree"
    d.mkdir()
    r = ok_run("--dir", d, "--seed", 21, "--ops", 1500, "--procs", 2)
    exp = expected_outcomes(r.stderr)
    assert exp.get("S:ENOENT", 0) > 0 and exp.get("S:EEXIST", 0) > 0
    assert sorted(os.listdir(d)) == [f"priv-{os.uname().nodename}-21", "shared"]

    # two separate invocations at once, as two nodes would: one shared dir, own private dirs
    procs = [subprocess.Popen([*STRESS, "run", "--dir", str(d), "--seed", str(seed), "--ops",
                               "1500", "--private", f"node{n}", "--progress", "1000"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for n, seed in ((1, 31), (2, 32))]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-6000:]
        assert "stress: 0 failure(s)" in err


def test_log_must_be_outside_the_tree(tmp_path):
    r = stress("run", "--dir", tmp_path, "--seed", 1, "--ops", 10, "--log", tmp_path / "x.log")
    assert r.returncode == 2
    assert "outside" in r.stderr


def test_stop_file_ends_the_run(tmp_path):
    """--stop-file: no op once the file exists; it must live outside the tree."""
    tree = tmp_path / "t"
    tree.mkdir()
    stop = tmp_path / "stop"
    r = stress("run", "--dir", tree, "--seed", 1, "--stop-file", tree / "stop")
    assert r.returncode == 2 and "outside" in r.stderr
    stop.touch()
    r = ok_run("--dir", tree, "--seed", 1, "--procs", 2, "--stop-file", stop)
    assert "2 process(es), seeds 1,2: 0 ops" in r.stderr, r.stderr


# ----------------------------------------------------------------------------
# the checkers catch what they are for


def _worker(tmp_path, seed, ops, **kw) -> stresslib.Worker:
    root = tmp_path / f"w{seed}"
    root.mkdir()
    cfg = stresslib.Config(root=str(root), seed=seed, ops=ops, shared=None, private="priv",
                           progress=1000)
    return stresslib.Worker(cfg, out=io.StringIO(), **kw)


def _once(change):
    """An after_op hook that applies ``change(worker, path, node, full_path)`` once,
    after the first op numbered 790 or later, to the first model entry it accepts."""
    state = {}

    def hook(w, op):
        if state or op.num < 790:
            return
        for path, node in w.model.walk():
            if change(w, path, node, os.path.join(w.pdir, path)):
                state["at"] = (op.num, path)
                return
    hook.state = state
    return hook


@pytest.mark.parametrize("what", ["byte", "size", "name", "xattr", "mode"])
def test_private_model_catches_outside_changes(tmp_path, what):
    def change(w, path, node, full):
        if what in ("byte", "size") and isinstance(node, stresslib.FileNode) and \
                node.content.size > 1000:
            if what == "size":
                os.truncate(full, node.content.size + 1)
                return True
            with open(full, "r+b") as f:
                f.seek(500)
                b = f.read(1)
                f.seek(500)
                f.write(bytes([b[0] ^ 1]))
            return True
        if what == "name" and isinstance(node, stresslib.DirNode):
            os.mkdir(os.path.join(full, "intruder"))
            return True
        if what == "xattr" and isinstance(node, stresslib.FileNode):
            os.setxattr(full, "user.intruder", b"1")
            return True
        if what == "mode" and isinstance(node, stresslib.DirNode):
            os.chmod(full, node.mode ^ 0o001)
            return True
        return False

    hook = _once(change)
    res = _worker(tmp_path, 5, 800, after_op=hook).run()
    assert hook.state, "the hook found nothing to change"
    _, path = hook.state["at"]
    assert res["nfailures"] >= 1, res
    want = {"byte": "differ from the model", "size": "size", "name": "intruder",
            "xattr": "user.intruder", "mode": "mode"}[what]
    assert want in res["failures"][0] and path in res["failures"][0], res["failures"]


def test_healthy_worker_has_no_failures(tmp_path):
    """The twin of the test above without the outside change: the failure is the change's."""
    hook = _once(lambda *a: False)
    res = _worker(tmp_path, 5, 800, after_op=hook).run()
    assert res["nfailures"] == 0, res["failures"]
    assert res["ops"] == 800


def test_watchdog_reports_a_hang(tmp_path):
    """An op that blocks (here: opening a FIFO nobody reads) is reported as a hang;
    the on_hang hook then unblocks it, so the run can end and be inspected."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    hung = []
    readers = []

    def hook(w, op):
        if op.num >= 10 and not hung:
            os.close(os.open(fifo, os.O_WRONLY))      # blocks until on_hang opens it

    def on_hang(w, msg):
        hung.append(msg)
        readers.append(os.open(fifo, os.O_RDONLY | os.O_NONBLOCK))

    w = _worker(tmp_path, 3, 40, after_op=hook, on_hang=on_hang)
    w.cfg.op_timeout = 0.5
    t = threading.Timer(30, lambda: os.close(os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)))
    t.start()          # a safety net should the watchdog never fire
    try:
        res = w.run()
    finally:
        t.cancel()
        for fd in readers:
            os.close(fd)
    assert len(hung) == 1 and re.match(r"hang: op \d+ \(", hung[0]), hung
    assert res["nfailures"] == 1 and "hang" in res["failures"][0]
    assert res["ops"] == 40


def test_errno_classification(tmp_path):
    """In the shared tree the outcomes of races are counted; EIO, ESTALE, EDEADLK,
    EAGAIN and anything unknown are failures; EOPNOTSUPP of punch is unsupported."""
    (tmp_path / "t").mkdir()
    w = stresslib.Worker(stresslib.Config(root=str(tmp_path / "t"), private=None),
                         out=io.StringIO())
    rmdir = stresslib.Op(0, "rmdir", "S", "d0")
    for code in (errno.ENOENT, errno.ENOTEMPTY):
        w._error(rmdir, OSError(code, "x"), private=False)
    w._error(stresslib.Op(1, "punch", "S", "f0"), OSError(errno.EOPNOTSUPP, "x"), False)
    assert w.nfailures == 0
    assert w.expected == {"S:ENOENT": 1, "S:ENOTEMPTY": 1}
    assert w.counts["punch"]["unsupported"] == 1
    for n, code in enumerate((errno.EIO, errno.ESTALE, errno.EDEADLK, errno.EAGAIN,
                              errno.ENOTEMPTY), 1):
        w._error(stresslib.Op(n, "read", "S", "f0"), OSError(code, "x"), private=False)
        assert w.nfailures == n, errno.errorcode[code]


def test_verify_catches_a_changed_fsynced_file(tmp_path):
    d, log = tmp_path / "tree", tmp_path / "stress.log"
    d.mkdir()
    ok_run("--dir", d, "--seed", 12, "--ops", 600, "--log", log, "--fsync-at-end",
           "--shared", "")
    clean = sorted(p for p, rec in last_records(log).items()
                   if rec["t"] == "fsync" and rec["size"] > 100)
    assert len(clean) >= 3
    assert verify(log).returncode == 0

    flipped, shrunk, gone = clean[:3]
    with open(d / flipped, "r+b") as f:
        f.seek(50)
        b = f.read(1)
        f.seek(50)
        f.write(bytes([b[0] ^ 0x80]))
    r = verify(log)
    assert r.returncode == 1
    assert f"FAILED {flipped}: content differs" in r.stdout
    assert verify_counts(r)[2] == 1

    os.truncate(d / shrunk, os.path.getsize(d / shrunk) - 1)
    os.rename(d / gone, d / (gone + ".moved"))
    r = verify(log)
    assert f"FAILED {shrunk}: size" in r.stdout
    assert f"FAILED {gone}: cannot open: ENOENT" in r.stdout
    assert verify_counts(r)[2] == 3

    # a path whose last record is "dirty" has no expectation any more
    with open(log, "a") as f:
        f.writelines(json.dumps({"t": "dirty", "path": p, "op": 10**6, "proc": 0}) + "\n"
                     for p in (flipped, shrunk, gone))
    r = verify(log)
    assert r.returncode == 0, r.stdout
    assert verify_counts(r)[2] == 0


# ----------------------------------------------------------------------------
# digest


def test_digest_equal_trees_and_every_difference(tmp_path):
    # the same seed on two trees (private only: no races) gives the same tree
    trees = []
    for name in ("a", "b", "c"):
        (tmp_path / name).mkdir()
        ok_run("--dir", tmp_path / name, "--seed", 13 if name != "c" else 14, "--ops", 700,
               "--shared", "", "--private", "p")
        trees.append(tmp_path / name)
    a = digest(trees[0])
    assert re.fullmatch(r"[0-9a-f]{64} entries=\d+ dirs=\d+ files=\d+ symlinks=\d+ other=0 "
                        r"bytes=\d+ xattrs=\d+ errors=0", a), a
    assert digest(trees[1]) == a
    assert digest(trees[2]) != a

    # a copy with hard links, xattrs and modes kept is equal, and stays equal when only
    # times change; each kind of difference changes it
    base = tmp_path / "base"
    (base / "dir").mkdir(parents=True)
    (base / "dir" / "f").write_bytes(b"hello world" * 100)
    os.link(base / "dir" / "f", base / "dir" / "g")
    os.symlink("dir/f", base / "s")
    os.setxattr(base / "dir" / "f", "user.k", b"v")

    def copy(name):
        dst = tmp_path / name
        subprocess.run(["cp", "-a", str(base), str(dst)], check=True)
        return dst

    want = digest(base)
    same = copy("same")
    os.utime(same / "dir" / "f", (1, 2))
    assert digest(same) == want

    mutations = {
        "byte": lambda t: (t / "dir" / "f").write_bytes(b"hello World" * 100),
        "mode": lambda t: os.chmod(t / "dir" / "f", 0o600),
        "xattr": lambda t: os.setxattr(t / "dir" / "f", "user.k", b"w"),
        "name": lambda t: os.rename(t / "dir" / "g", t / "dir" / "h"),
        "target": lambda t: (os.unlink(t / "s"), os.symlink("dir/g", t / "s")),
        "hardlink": lambda t: (os.unlink(t / "dir" / "g"), (t / "dir" / "g").write_bytes(
            b"hello world" * 100)),
        "extra": lambda t: (t / "dir" / "empty").touch(),
        "fifo": lambda t: os.mkfifo(t / "fifo"),
    }
    seen = {want}
    for name, mutate in mutations.items():
        t = copy(name)
        mutate(t)
        got = digest(t)
        assert got.split()[0] not in {s.split()[0] for s in seen}, name
        seen.add(got)
    assert "other=1" in digest(tmp_path / "fifo")

    # --list prints the records the hash is made of
    r = stress("digest", "--dir", base, "--list")
    recs = [json.loads(x) for x in r.stdout.splitlines()[:-1]]
    assert [x["path"] for x in recs] == [".", "dir", "dir/f", "dir/g", "s"]
    assert recs[3]["same_as"] == "dir/f"


# ----------------------------------------------------------------------------
# a real clusterfs mount


def test_clusterfs_mount(cfs, tmp_path):
    """One process (so the run is the same every time), private and shared trees."""
    log = tmp_path / "stress.log"
    r = ok_run("--dir", cfs.root, "--seed", 3, "--ops", 600, "--log", log, "--fsync-at-end")
    t = table(r.stderr)
    assert t["write"]["ok"] > 0 and t["fsync"]["ok"] > 0
    before = digest(cfs.root)
    cfs.remount()
    v = verify(log, cfs.root)
    assert v.returncode == 0, v.stdout
    assert verify_counts(v)[0] >= 10
    assert digest(cfs.root) == before
    # the cfs fixture unmounts and requires a clean fsck


@pytest.mark.device_size(1 << 30)
def test_four_processes_racing_in_one_directory_on_clusterfs(cfs):
    """Creates, unlinks, links, renames and listings racing in one shared directory.
    Found two bugs: readdir reading an entry's inode after another request had freed it
    (withdraw: "bad magic 0x0"), and a file freed while the kernel still named it, which
    a racing link() then brought back (leaked and doubly used blocks; fsck caught it).
    The cfs fixture requires a clean fsck afterwards."""
    ok_run("--dir", cfs.root, "--seed", 600, "--ops", 3000, "--procs", 4, "--private", "",
           timeout=600)


@pytest.mark.slow
@pytest.mark.device_size(2 << 30)
def test_soak_many_seeds_on_clusterfs(cfs, tmp_path):
    """Twelve seeds, two processes each, 4000 ops per process, on one mount whose shared
    tree keeps growing; after each: remount, verify, digest unchanged; fsck at the end."""
    for seed in range(1000, 1120, 10):
        log = tmp_path / f"stress-{seed}.log"
        ok_run("--dir", cfs.root, "--seed", seed, "--ops", 4000, "--procs", 2, "--log", log,
               "--fsync-at-end", "--max-offset", "64MiB", timeout=1800)
        before = digest(cfs.root)
        cfs.remount()
        v = verify(log, cfs.root)
        assert v.returncode == 0, (seed, v.stdout)
        assert digest(cfs.root) == before, seed
        subprocess.run(["rm", "-rf", cfs.path(f"priv-{os.uname().nodename}-{seed}")],
                       check=True)
