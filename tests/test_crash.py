"""Crash consistency (issue 2, item 5): kill -9 the mount process at random
moments of a metadata-heavy workload, many times. After each crash the remount
replays the journal, fsck is clean, and every file whose fsync had returned is
intact.

The workload runs in its own process (this file, run as a script), never in
the mount process. It churns metadata in a few shared directories (create,
append, truncate, rename, link, symlink, unlink, mkdir/rmdir, setxattr) and
now and then writes a *durable* file ``dur-*``: written, fsync'd — and, for
the rename flavour, renamed into place and the directory fsync'd — and only
then logged (name, size, sha256) to a log file OUTSIDE the mount, which is
fsync'd too. Durable files are never touched again, and churn never touches a
``dur-*`` name, so after a crash every logged file must be there with exactly
the logged content.

For ext4 the kernel cannot be kill -9'd; there the "crash" kills the workload
and the filesystem is unmounted and mounted again. That validates the
workload, the log and the checks themselves.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import random
import signal
import subprocess
import sys
import time

import mountutil
import pytest

DIRS = 6
DURABLE_PER_ROUND = 150


# ============================================================================ the workload


def _workload(root: str, log_path: str, seed: int, tag: str) -> None:
    try:
        _workload_body(root, log_path, seed, tag)
    except OSError as e:
        # the mount died under us (ENOTCONN/ECONNABORTED): that is the point.
        # Any other error (EIO, ENOSPC...) is a failure of the filesystem.
        print(f"workload stopped: {e!r}", file=sys.stderr)
        os._exit(0 if e.errno in (errno.ENOTCONN, errno.ECONNABORTED) else 3)


def _workload_body(root: str, log_path: str, seed: int, tag: str) -> None:
    rng = random.Random(seed)
    log_fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    dirs = [os.path.join(root, f"dir{k}") for k in range(DIRS)]
    for d in dirs:
        os.makedirs(d, exist_ok=True)
    tmp: list[str] = []       # churn files (regular), may vanish
    subdirs: list[str] = []
    for d in dirs:
        for name in os.listdir(d):
            p = os.path.join(d, name)
            if name.startswith("tmp-"):
                tmp.append(p)
            elif name.startswith("sub-"):
                subdirs.append(p)
    seq = 0
    sizes = [0, 1, 100, 4095, 4096, 4097, 10_000, 40_000, 65_536, 150_000]
    weights = [2, 2, 6, 2, 3, 2, 6, 3, 2, 1]

    def payload() -> bytes:
        return rng.randbytes(rng.choices(sizes, weights)[0])

    def durable(via_rename: bool) -> None:
        nonlocal seq
        seq += 1
        d = rng.choice(dirs)
        name = f"dur-{tag}-{seq:05d}"
        final = os.path.join(d, name)
        data = payload()
        path = os.path.join(d, f"tmp-{tag}-{seq:05d}-pre") if via_rename else final
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            view = memoryview(data)
            while view:   # in pieces, so the crash can land mid-file
                n = os.write(fd, view[: rng.choice([4096, 10_000, 65_536])])
                view = view[n:]
            os.fsync(fd)
        finally:
            os.close(fd)
        if via_rename:
            os.rename(path, final)
            dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        line = f"{os.path.relpath(final, root)} {len(data)} {hashlib.sha256(data).hexdigest()}\n"
        os.write(log_fd, line.encode())
        os.fsync(log_fd)

    def churn() -> None:
        nonlocal seq
        seq += 1
        op = rng.random()
        d = rng.choice(dirs + subdirs) if subdirs and rng.random() < 0.3 else rng.choice(dirs)
        if len(tmp) > 300:              # keep the churn set bounded
            os.unlink(tmp.pop(rng.randrange(len(tmp))))
        elif op < 0.25 or not tmp:
            p = os.path.join(d, f"tmp-{tag}-{seq:05d}")
            with open(p, "wb") as f:
                f.write(payload())
            tmp.append(p)
        elif op < 0.35:
            with open(rng.choice(tmp), "ab") as f:
                f.write(payload())
        elif op < 0.42:
            os.truncate(rng.choice(tmp), rng.choice([0, 1, 5000, 70_000]))
        elif op < 0.57:
            src = tmp.pop(rng.randrange(len(tmp)))
            dst = os.path.join(rng.choice(dirs + subdirs), f"tmp-{tag}-{seq:05d}-mv")
            if tmp and rng.random() < 0.3:
                dst = rng.choice(tmp)          # rename over an existing file
                tmp.remove(dst)
            os.rename(src, dst)
            tmp.append(dst)
        elif op < 0.72:
            os.unlink(tmp.pop(rng.randrange(len(tmp))))
        elif op < 0.78:
            p = os.path.join(d, f"tmp-{tag}-{seq:05d}-ln")
            os.link(rng.choice(tmp), p)
            tmp.append(p)
        elif op < 0.82:
            os.symlink(rng.choice(tmp), os.path.join(d, f"sym-{tag}-{seq:05d}"))
        elif op < 0.88:
            p = os.path.join(rng.choice(dirs), f"sub-{tag}-{seq:05d}")
            os.mkdir(p)
            subdirs.append(p)
        elif op < 0.92 and subdirs:
            p = subdirs[rng.randrange(len(subdirs))]
            if not os.listdir(p):
                os.rmdir(p)
                subdirs.remove(p)
        elif op < 0.96:
            os.setxattr(rng.choice(tmp), "user.churn", rng.randbytes(rng.choice([1, 100, 2000])))
        else:
            with open(rng.choice(tmp), "rb") as f:
                f.read()

    budget = DURABLE_PER_ROUND    # bounds disk use over hundreds of rounds
    while True:
        r = rng.random()
        if budget <= 0:
            r = 1.0
        else:
            budget -= r < 0.30
        if r < 0.22:
            durable(via_rename=False)
        elif r < 0.30:
            durable(via_rename=True)
        else:
            try:
                churn()
            except FileNotFoundError:
                # a churn name whose link went away with a rename over it: forget it
                tmp[:] = [p for p in tmp if os.path.lexists(p)]


# ============================================================================ the test


def _read_log(log_path: str) -> dict[str, tuple[int, str]]:
    out = {}
    try:
        with open(log_path) as f:
            text = f.read()
    except FileNotFoundError:
        return out
    for line in text.splitlines(keepends=True):
        if not line.endswith("\n"):
            break           # torn last line: the workload died while logging
        name, size, digest = line.split()
        assert name not in out, f"workload logged {name} twice"
        out[name] = (int(size), digest)
    return out


def _verify(root: str, expected: dict[str, tuple[int, str]], context: str,
            full: bool = True, already: set[str] | frozenset = frozenset()) -> None:
    """Check the fsync'd files; with ``full=False`` only those not in ``already``
    plus a sample of 300 of the others, and only stat (not read) the rest."""
    names = list(expected)
    if not full:
        new = [n for n in names if n not in already]
        old = [n for n in names if n in already]
        names = new + random.sample(old, min(300, len(old)))
    bad = []
    for name in names:
        size, digest = expected[name]
        p = os.path.join(root, name)
        try:
            with open(p, "rb") as f:
                data = f.read()
        except OSError as e:
            bad.append(f"{name}: {e!r}")
            continue
        if len(data) != size or hashlib.sha256(data).hexdigest() != digest:
            bad.append(f"{name}: {len(data)} bytes, sha {hashlib.sha256(data).hexdigest()[:12]}"
                       f" (fsync'd {size} bytes, sha {digest[:12]})")
    assert not bad, (f"{context}: {len(bad)} of {len(expected)} fsync'd files damaged:\n"
                     + "\n".join(bad[:30]))
    # everything else on the filesystem must at least be walkable and readable
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            st = os.lstat(p)
            if full and os.path.isfile(p) and not os.path.islink(p):
                with open(p, "rb") as f:
                    assert len(f.read()) == st.st_size, f"{context}: {p} short read"


def _start_workload(root: str, log_path: str, seed: int, tag: str, errlog: str):
    with open(errlog, "ab") as err:
        return subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--workload", root, log_path,
             str(seed), tag], stdout=err, stderr=err, stdin=subprocess.DEVNULL,
            start_new_session=True)


def _run_rounds(fsys, tmp_path, rounds: int, seed: int) -> None:
    rng = random.Random(seed)
    log_path = str(tmp_path / "fsynced.log")      # outside the mount
    errlog = str(tmp_path / "workload.err")
    crashed = False
    verified: set[str] = set()
    t0 = time.monotonic()
    for rnd in range(rounds):
        if crashed and fsys.fs == "clusterfs" and rng.random() < 0.25:
            # crash again during start-up / journal replay: replay must be idempotent
            early = mountutil.start_mount(fsys.device, fsys.root, wait=False)
            time.sleep(rng.uniform(0.05, 1.0))
            early.clean_after_crash()
        if fsys.mnt is None:
            fsys.mount()                   # replays the journal after a crash
        ctx = f"round {rnd} (seed {seed})"
        expected = _read_log(log_path)
        _verify(fsys.root, expected, ctx + " after replay", full=False, already=verified)
        verified = set(expected)
        if crashed:
            fsys.unmount()
            r = fsys.fsck()
            assert r.returncode == 0, (f"{ctx}: fsck after replay not clean ({r.returncode}):\n"
                                       f"{r.stdout}{r.stderr}")
            fsys.mount()
            _verify(fsys.root, expected, ctx + " after fsck", full=False, already=verified)

        print(f"{ctx}: {len(expected)} fsync'd files verified, t={time.monotonic() - t0:.1f}s")
        wl = _start_workload(fsys.root, log_path, rng.randrange(1 << 30), f"r{rnd:03d}", errlog)
        try:
            time.sleep(rng.uniform(0.3, 2.5))
            assert wl.poll() is None, f"{ctx}: workload exited early:\n" + open(errlog).read()
            if fsys.fs == "ext4":
                os.killpg(wl.pid, signal.SIGKILL)
                wl.wait()
                fsys.unmount()
            else:
                mnt, fsys.mnt = fsys.mnt, None
                try:
                    assert mnt.alive(), f"{ctx}: mount process died by itself:\n" + \
                        mnt.log_text()
                    mnt.kill9()               # the crash
                    assert wl.wait(30) == 0, f"{ctx}: workload failed:\n" + open(errlog).read()
                finally:
                    mnt.clean_after_crash()
            crashed = True
        finally:
            if wl.poll() is None:
                os.killpg(wl.pid, signal.SIGKILL)
                wl.wait()

    fsys.mount()
    expected = _read_log(log_path)
    _verify(fsys.root, expected, "final")
    # the test proves nothing if the workload never got a file fsync'd
    assert len(expected) >= rounds, f"only {len(expected)} fsync'd files in {rounds} rounds"
    fsys.unmount()
    r = fsys.fsck()
    assert r.returncode == 0, f"final fsck not clean:\n{r.stdout}{r.stderr}"


@pytest.mark.device_size(512 << 20)
def test_kill9_during_metadata_workload(fsys, tmp_path):
    # ext4 only validates the harness (it cannot be kill -9'd): fewer rounds there
    default = "20" if fsys.fs == "clusterfs" else "5"
    rounds = int(os.environ.get("CLUSTERFS_CRASH_ROUNDS", default))
    seed = int(os.environ.get("CLUSTERFS_CRASH_SEED", str(random.randrange(1 << 30))))
    print(f"crash test seed {seed}, {rounds} rounds")
    _run_rounds(fsys, tmp_path, rounds, seed)


@pytest.mark.slow
@pytest.mark.device_size(2 << 30)
def test_kill9_during_metadata_workload_200_rounds(fsys, tmp_path):
    seed = int(os.environ.get("CLUSTERFS_CRASH_SEED", str(random.randrange(1 << 30))))
    print(f"crash test seed {seed}, 200 rounds")
    _run_rounds(fsys, tmp_path, 200, seed)


if __name__ == "__main__" and len(sys.argv) == 6 and sys.argv[1] == "--workload":
    _workload(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5])


def test_fdatasync_of_an_overwrite_survives_kill9(cfs):
    """fdatasync of an in-place overwrite skips the journal commit (only data + flush):
    the bytes must still be there after kill -9; and an fdatasync that grew the file
    must still commit its new size."""
    path = cfs.path("f")
    first = os.urandom(1 << 20)
    with open(path, "wb") as f:
        f.write(first)
        f.flush()
        os.fsync(f.fileno())
    patch, tail = os.urandom(8192), os.urandom(5000)
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, patch, 65536)        # in place: no size or block-map change
        os.fdatasync(fd)
        os.pwrite(fd, tail, len(first))    # grows the file: the size must be committed
        os.fdatasync(fd)
    finally:
        os.close(fd)
    mnt, cfs.mnt = cfs.mnt, None
    mnt.clean_after_crash()
    cfs.mount()
    with open(path, "rb") as f:
        got = f.read()
    want = bytearray(first)
    want[65536 : 65536 + len(patch)] = patch
    assert got == bytes(want) + tail


def test_a_file_unlinked_while_open_is_freed_after_kill9(cfs):
    """Unlinked while open, then the mount dies: nobody will ever close it. The inode is
    in the slot's orphan list (committed with its link count), so the next mount frees
    it: the space comes back and fsck finds no leak (the fixture's final check)."""
    before = os.statvfs(cfs.path(".")).f_bfree
    fd = os.open(cfs.path("tmpfile"), os.O_RDWR | os.O_CREAT, 0o600)
    os.write(fd, os.urandom(4 << 20))
    os.unlink(cfs.path("tmpfile"))
    os.fsync(fd)                          # commits the unlink and the orphan entry
    mnt, cfs.mnt = cfs.mnt, None
    mnt.clean_after_crash()
    with contextlib.suppress(OSError):
        os.close(fd)
    cfs.mount()
    deadline = time.monotonic() + 30
    while os.statvfs(cfs.path(".")).f_bfree < before - 8 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert os.statvfs(cfs.path(".")).f_bfree >= before - 8, "the orphan was not freed"
