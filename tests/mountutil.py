"""Black-box helpers for real-mount tests: loop devices, mkfs/fsck, mounts.

Everything here drives the filesystem through its command line and the
kernel (losetup, mount, fusermount3), never by importing clusterfs. The same
helpers run ext4 on a loop device, so a test can be proven right against a
filesystem we trust before it is pointed at clusterfs.

Cleanup is the point of this module. Every loop device, mount and server
process created here is registered in ``_REGISTRY`` the moment it exists and
removed from it once it is gone; ``cleanup_all()`` (called from conftest at
session end and from atexit) tears down whatever a failed or interrupted test
left behind. Nothing here ever touches a device, mount or process it did not
create: loop devices come from ``losetup -f --show`` and are detached by the
exact name returned; processes are killed by their own pid.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
from devclusterlib import abort_fuse_connection, fuse_connection  # noqa: E402

from clusterfs.format.block import BLOCK_SIZE  # noqa: E402
from clusterfs.storage import holders  # noqa: E402

CLUSTERFS = [sys.executable, "-m", "clusterfs.cli"]
FS_KINDS = ("clusterfs", "ext4")
MOUNT_TIMEOUT = float(os.environ.get("CLUSTERFS_TEST_MOUNT_TIMEOUT", "60"))
UNMOUNT_TIMEOUT = float(os.environ.get("CLUSTERFS_TEST_UNMOUNT_TIMEOUT", "30"))
BUSY_RETRY = 10.0      # seconds a clean unmount tries again while the mount is busy


# ----------------------------------------------------------------------------
# registry of things we created, for last-resort cleanup


_GUARDIAN_SCRIPT = r"""
import os, subprocess, sys, time
loops, mounts = {}, {}
for line in sys.stdin:
    op, kind, name = line[0], line[1], line[2:].rstrip("\n")
    table = loops if kind == "L" else mounts
    if op == "+":
        table[name] = kind
    else:
        table.pop(name, None)
# EOF: the test process is gone. Its FUSE servers got SIGTERM (PDEATHSIG) and are
# unmounting; give them a moment, then remove whatever is still there.
if not loops and not mounts:
    sys.exit(0)
time.sleep(3)
for mp in mounts:
    subprocess.run(["fusermount3", "-u", "-z", mp], capture_output=True)
    subprocess.run(["umount", "-l", mp], capture_output=True)
for dev in loops:
    for _ in range(50):
        if subprocess.run(["losetup", "-d", dev], capture_output=True).returncode == 0:
            break
        time.sleep(0.2)
"""


class _Registry:
    """What this process created and has not removed yet.

    A guardian process mirrors it through a pipe; if the test process dies
    without cleaning up (even SIGKILL), the pipe closes and the guardian
    unmounts and detaches exactly these, and nothing else.
    """

    def __init__(self) -> None:
        self.loops: dict[str, Path] = {}      # /dev/loopN -> backing file
        self.mounts: dict[str, Mount] = {}    # mountpoint -> Mount
        self._guardian: subprocess.Popen | None = None
        self._guardian_pid = None

    def _tell(self, line: str) -> None:
        if self._guardian is None or self._guardian_pid != os.getpid():
            if self._guardian_pid is not None and self._guardian_pid != os.getpid():
                return     # a forked child (run_as): only the creator reports
            self._guardian = subprocess.Popen(
                [sys.executable, "-c", _GUARDIAN_SCRIPT], stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True,
                start_new_session=True)
            self._guardian_pid = os.getpid()
        with contextlib.suppress(OSError, ValueError):
            self._guardian.stdin.write(line + "\n")
            self._guardian.stdin.flush()

    def add_loop(self, dev: str, backing: Path) -> None:
        self.loops[dev] = backing
        self._tell("+L" + dev)

    def remove_loop(self, dev: str) -> None:
        if self.loops.pop(dev, None) is not None:
            self._tell("-L" + dev)

    def add_mount(self, m: Mount) -> None:
        self.mounts[m.mountpoint] = m
        self._tell("+M" + m.mountpoint)

    def remove_mount(self, mountpoint: str) -> None:
        if self.mounts.pop(mountpoint, None) is not None:
            self._tell("-M" + mountpoint)


_REGISTRY = _Registry()


def cleanup_all() -> list[str]:
    """Tear down every mount and loop device this process created and still holds.

    Returns a description of what had been left behind (empty when the tests
    cleaned up after themselves).
    """
    leaked = []
    for mnt in list(_REGISTRY.mounts.values()):
        leaked.append(f"mount {mnt.mountpoint} ({mnt.fs})")
        with contextlib.suppress(Exception):
            mnt.force_unmount()
    for dev in list(_REGISTRY.loops):
        leaked.append(f"loop device {dev}")
        _detach_loop(dev)
    return leaked


atexit.register(cleanup_all)


# ----------------------------------------------------------------------------
# environment checks


def require_mounts(fs: str = "clusterfs") -> None:
    """Fail the calling test when real mounts of `fs` cannot run here (see require)."""
    require(missing_prerequisites(fs))


def require(why: str | None) -> None:
    """Fail the calling test when `why` says a real part it needs is missing here.

    A failure, not a skip: a CI machine without root, loop devices, FUSE or network
    namespaces would otherwise pass with every such test skipped. CLUSTERFS_ALLOW_SKIP=1
    turns it into a skip, for developing the pure-logic parts on a machine without them.
    """
    import pytest

    if why is None:
        return
    if os.environ.get("CLUSTERFS_ALLOW_SKIP") == "1":
        pytest.skip(why)
    pytest.fail(f"{why} (CLUSTERFS_ALLOW_SKIP=1 skips these tests instead)", pytrace=False)


def missing_prerequisites(fs: str = "clusterfs") -> str | None:
    """Why real-mount tests cannot run here, or None when they can."""
    if os.geteuid() != 0:
        return "real-mount tests need root (losetup, mount)"
    if shutil.which("losetup") is None:
        return "losetup not installed"
    if not os.path.exists("/dev/loop-control") and not os.path.exists("/dev/loop0"):
        return "no loop device support (/dev/loop-control missing)"
    if fs == "clusterfs" or fs == "null":
        if not os.path.exists("/dev/fuse"):
            return "/dev/fuse missing"
        if shutil.which("fusermount3") is None:
            return "fusermount3 not installed"
    if fs == "ext4" and shutil.which("mkfs.ext4") is None:
        return "mkfs.ext4 not installed"
    return None


# ----------------------------------------------------------------------------
# loop devices


def _detach_loop(dev: str) -> None:
    for _ in range(50):
        r = subprocess.run(["losetup", "-d", dev], capture_output=True, text=True)
        if r.returncode == 0 or "No such device" in r.stderr:
            break
        time.sleep(0.1)  # still busy: a lazy unmount may still hold it
    _REGISTRY.remove_loop(dev)


@contextlib.contextmanager
def loop_device(size_bytes: int, directory: str | os.PathLike | None = None,
                name: str = "disk.img") -> Iterator[str]:
    """A loop device over a fresh sparse file of ``size_bytes``; detached on exit.

    The backing file lives in ``directory`` (the test's tmp dir) or in a new
    temporary directory that is removed afterwards.
    """
    own_dir = None
    if directory is None:
        own_dir = tempfile.mkdtemp(prefix="cfs-loop-")
        directory = own_dir
    backing = Path(directory) / name
    with open(backing, "wb") as f:
        f.truncate(size_bytes)
    keep = False
    try:
        with attach_loop(str(backing)) as dev:
            yield dev
    except BaseException:
        # a failed test's image, for a look afterwards (fsck, journal scans) on request
        keep = bool(os.environ.get("CLUSTERFS_KEEP_IMAGE")) and own_dir is None
        raise
    finally:
        if not keep:
            with contextlib.suppress(OSError):
                backing.unlink()
        if own_dir is not None:
            shutil.rmtree(own_dir, ignore_errors=True)


@contextlib.contextmanager
def attach_loop(backing: str) -> Iterator[str]:
    """A loop device over an existing file (``losetup -f --show``); detached on exit."""
    dev = None
    try:
        r = subprocess.run(["losetup", "-f", "--show", backing],
                           capture_output=True, text=True, check=True)
        dev = r.stdout.strip()
        _REGISTRY.add_loop(dev, Path(backing))
        yield dev
    finally:
        if dev is not None:
            _detach_loop(dev)


# ----------------------------------------------------------------------------
# mkfs / fsck


def mkfs(device: str, journals: int | None = None, force: bool = False,
         fs: str = "clusterfs", check: bool = True) -> subprocess.CompletedProcess:
    """Format ``device``; ``fs="ext4"`` runs mkfs.ext4 instead (always forced).

    ext4 gets one inode per 4 KiB so that it, like clusterfs, can hold a
    100 000-entry directory on a small device.
    """
    if fs == "ext4":
        cmd = ["mkfs.ext4", "-q", "-F", "-b", "4096", "-i", "4096", "-E",
               "lazy_itable_init=0,lazy_journal_init=0", device]
    elif fs == "clusterfs":
        cmd = [*CLUSTERFS, "mkfs"]
        if journals is not None:
            cmd += ["-j", str(journals)]
        if force:
            cmd.append("--force")
        cmd.append(device)
    else:
        raise ValueError(f"mkfs: unknown fs {fs!r}")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout}{r.stderr}")
    return r


def fsck(device: str, repair: bool = False, fs: str = "clusterfs",
         timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the checker; returns the CompletedProcess (exit 0 means clean)."""
    if fs == "ext4":
        cmd = ["fsck.ext4", "-f", "-p" if repair else "-n", device]
    else:
        cmd = [*CLUSTERFS, "fsck"] + (["--repair"] if repair else []) + [device]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def device_hash(device: str) -> str:
    """sha256 of the whole device (or image file)."""
    h = hashlib.sha256()
    with open(device, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def flip_bits(block: bytes) -> bytes:
    """`block` with bits flipped in its middle, where its checksum covers them."""
    flipped = bytearray(block)
    for i in range(1000, 1016):
        flipped[i] ^= 0x5A
    return bytes(flipped)


def swap_block(device: str, blkno: int, new: bytes | None = None) -> bytes:
    """Write `new` over block `blkno` of `device`, synced (None: the block as it is
    with its bits flipped: flip_bits); the block as it was."""
    fd = os.open(device, os.O_RDWR)
    try:
        old = os.pread(fd, BLOCK_SIZE, blkno * BLOCK_SIZE)
        os.pwrite(fd, flip_bits(old) if new is None else new, blkno * BLOCK_SIZE)
        os.fsync(fd)
        return old
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------
# mounts


# mountinfo writes space, tab, newline and backslash as \\ooo, UTF-8 as it is (the same
# decoding as clusterfs.node.umount_cmd; this module never imports clusterfs)
_MOUNTINFO_ESCAPE = re.compile(r"\\([0-7]{3})")


def _is_mounted(path: str) -> bool:
    """True if ``path`` is a mountpoint, judged from /proc/self/mountinfo.

    os.path.ismount() stats the path, which hangs or fails with ENOTCONN on a
    FUSE mount whose server is dead; mountinfo never touches the mount.
    """
    real = os.path.abspath(path)   # not realpath: it would stat a hung mount
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mp = _MOUNTINFO_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), line.split()[4])
            if mp == real:
                return True
    return False


def _fuse_connection(path: str) -> int | None:
    """The FUSE connection number of the mount at ``path`` (its device minor)."""
    return fuse_connection(os.path.abspath(path))   # not realpath: it would stat a hung mount


@dataclass
class Mount:
    """One live mount made by ``mounted()``."""

    fs: str
    device: str
    mountpoint: str
    log: str                     # file holding the server's stdout+stderr
    proc: subprocess.Popen | None = None   # the FUSE server (None for ext4)
    conn: int | None = None      # FUSE connection number
    _logf: object = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def path(self, *parts: str) -> str:
        return os.path.join(self.mountpoint, *parts)

    def log_text(self) -> str:
        try:
            with open(self.log, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill9(self) -> None:
        """Crash the server: SIGKILL, then wait for it (the mount stays, dead)."""
        if self.proc is not None and self.proc.poll() is None:
            # the server leads its own session (start_new_session): kill all of it
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            try:
                self.proc.wait(2)
            except subprocess.TimeoutExpired:
                # a thread of the dead server is stuck in the kernel (an entry
                # invalidation waiting for a directory lock that a request to the dead
                # server holds): it dies only once the connection is aborted, as it
                # would with a dead host's kernel
                conn = self.conn if self.conn is not None else \
                    _fuse_connection(self.mountpoint)
                if conn is not None:
                    abort_fuse_connection(conn)
                self.proc.wait()

    def unmount(self, timeout: float = UNMOUNT_TIMEOUT) -> None:
        """Clean unmount. Raises AssertionError (after forcing it) when the
        filesystem did not unmount or the server did not exit with status 0."""
        try:
            self._clean_unmount(timeout)
        except BaseException:
            self.force_unmount()
            raise
        self._forget()

    def _fusermount(self, timeout: float) -> subprocess.CompletedProcess:
        """fusermount3 -u, again for a few seconds while the mount is busy: on a loaded
        machine a process of the test that just finished with the mount (a writer,
        a reader's close) can still hold it for a moment (two tests saw EBUSY at
        teardown, 2026-12-05, under three concurrent suites)."""
        deadline = time.monotonic() + BUSY_RETRY
        while True:
            r = subprocess.run(["fusermount3", "-u", self.mountpoint], capture_output=True,
                               text=True, timeout=timeout)
            if r.returncode == 0 or "busy" not in r.stderr or time.monotonic() > deadline:
                return r
            time.sleep(0.5)

    def _clean_unmount(self, timeout: float) -> None:
        if self.fs == "ext4":
            r = subprocess.run(["umount", self.mountpoint], capture_output=True, text=True,
                               timeout=timeout)
            if r.returncode != 0:
                raise AssertionError(f"umount {self.mountpoint}: {r.stderr.strip()}")
            return
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(
                f"{self.fs} server exited ({self.proc.returncode}) before unmount; log:\n"
                + self.log_text())
        r = self._fusermount(timeout)
        if r.returncode != 0:
            users = holders.mount_users(self.mountpoint)
            raise AssertionError(f"fusermount3 -u {self.mountpoint}: {r.stderr.strip()}"
                                 + (f"; in use by {'; '.join(users)}" if users else ""))
        if self.proc is not None:
            try:
                rc = self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                raise AssertionError(
                    f"{self.fs} server still running {timeout}s after unmount; log:\n"
                    + self.log_text()) from None
            if rc != 0:
                raise AssertionError(f"{self.fs} server exited {rc} after unmount; log:\n"
                                     + self.log_text())

    def force_unmount(self) -> None:
        """Get rid of the mount and the server whatever state they are in."""
        if self.fs == "ext4":
            if _is_mounted(self.mountpoint):
                r = subprocess.run(["umount", self.mountpoint], capture_output=True)
                if r.returncode != 0:
                    subprocess.run(["umount", "-l", self.mountpoint], capture_output=True)
            self._forget()
            return
        if self.proc is not None and self.proc.poll() is None:
            if _is_mounted(self.mountpoint):
                with contextlib.suppress(subprocess.TimeoutExpired):
                    subprocess.run(["fusermount3", "-u", self.mountpoint],
                                   capture_output=True, timeout=5)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(10)
        if _is_mounted(self.mountpoint):
            conn = self.conn if self.conn is not None else _fuse_connection(self.mountpoint)
            if conn is not None:
                abort_fuse_connection(conn)
            subprocess.run(["fusermount3", "-u", "-z", self.mountpoint], capture_output=True)
            if _is_mounted(self.mountpoint):
                subprocess.run(["umount", "-l", self.mountpoint], capture_output=True)
        self._forget()

    def clean_after_crash(self) -> None:
        """After kill9(): abort the dead connection and detach the mountpoint."""
        self.kill9()
        self.force_unmount()

    def _forget(self) -> None:
        _REGISTRY.remove_mount(self.mountpoint)
        if self._logf is not None:
            with contextlib.suppress(Exception):
                self._logf.close()
            self._logf = None


def _die_with_parent() -> None:
    """In the server child: get SIGTERM (= clean unmount) if the test process dies,
    so even a SIGKILLed pytest leaves no mount behind."""
    import ctypes  # noqa: PLC0415
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def _server_cmd(fs: str, device: str, mountpoint: str, extra_args: Sequence[str]) -> list[str]:
    if fs == "clusterfs":
        return [*CLUSTERFS, "mount", "-f", *extra_args, device, mountpoint]
    if fs == "null":
        nullfs = Path(__file__).resolve().parent.parent / "tools" / "nullfs.py"
        return [sys.executable, str(nullfs), *extra_args, mountpoint]
    if fs == "hangable":     # `device`: the image it passes through (hangable_disk.py)
        hangable = Path(__file__).resolve().parent / "hangable_disk.py"
        return [sys.executable, str(hangable), device, mountpoint, *extra_args]
    raise ValueError(f"mounted: unknown fs {fs!r}")


def default_log(mountpoint: str, fs: str = "clusterfs") -> str:
    """Where start_mount writes a mount's output unless told: beside the mount point,
    named after it (DIR/node1 -> DIR/node1.clusterfs.log)."""
    return os.path.join(os.path.dirname(mountpoint), f"{os.path.basename(mountpoint)}.{fs}.log")


def start_mount(device: str, mountpoint: str, fs: str = "clusterfs",
                extra_args: Sequence[str] = (), log: str | None = None,
                timeout: float = MOUNT_TIMEOUT, wait: bool = True) -> Mount:
    """Mount and return the live Mount; the caller must unmount (or use ``mounted``).

    ``wait=False`` (FUSE only) returns as soon as the server process is started,
    e.g. to kill it in the middle of its start-up and journal replay.
    """
    mountpoint = os.path.realpath(mountpoint)
    os.makedirs(mountpoint, exist_ok=True)
    if _is_mounted(mountpoint):
        raise AssertionError(f"{mountpoint} is already a mountpoint")
    if log is None:
        log = default_log(mountpoint, fs)
    if fs == "ext4":
        with open(log, "a") as logf:
            r = subprocess.run(["mount", "-t", "ext4", *extra_args, device, mountpoint],
                               stdout=logf, stderr=subprocess.STDOUT, timeout=timeout)
        m = Mount(fs=fs, device=device, mountpoint=mountpoint, log=log)
        if r.returncode != 0:
            raise AssertionError(f"mount ext4 {device} failed:\n{m.log_text()}")
        _REGISTRY.add_mount(m)
        return m

    logf = open(log, "ab")  # noqa: SIM115 - closed by Mount._forget
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(_server_cmd(fs, device, mountpoint, extra_args),
                            stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                            env=env, start_new_session=True, preexec_fn=_die_with_parent)
    m = Mount(fs=fs, device=device, mountpoint=mountpoint, log=log, proc=proc, _logf=logf)
    _REGISTRY.add_mount(m)
    if not wait:
        return m
    deadline = time.monotonic() + timeout
    while True:
        if _is_mounted(mountpoint):
            m.conn = _fuse_connection(mountpoint)
            return m
        if proc.poll() is not None:
            m.force_unmount()
            raise AssertionError(
                f"{fs} mount of {device} exited with {proc.returncode} before the mount "
                f"was live; log:\n{m.log_text()}")
        if time.monotonic() > deadline:
            m.force_unmount()
            raise AssertionError(f"{fs} mount of {device} not live after {timeout}s; "
                                 f"log:\n{m.log_text()}")
        time.sleep(0.05)


@contextlib.contextmanager
def mounted(device: str, mountpoint: str, fs: str = "clusterfs",
            extra_args: Sequence[str] = (), log: str | None = None,
            timeout: float = MOUNT_TIMEOUT) -> Iterator[Mount]:
    """Mount ``device`` at ``mountpoint`` for the body; unmount cleanly on exit.

    ``fs`` is "clusterfs" (``clusterfs mount -f`` as a subprocess), "ext4"
    (kernel mount; format it first with ``mkfs(dev, fs="ext4")``) or "null"
    (tools/nullfs.py; ``device`` is ignored). A clean unmount that fails, or a
    server that exits nonzero, fails the test after forcing the unmount. If
    the body raised, the unmount is forced and the body's error propagates.
    """
    m = start_mount(device, mountpoint, fs, extra_args, log, timeout)
    try:
        yield m
    except BaseException:
        m.force_unmount()
        raise
    if m.mountpoint in _REGISTRY.mounts:   # body may have unmounted / crashed it itself
        m.unmount()


def run_cli(*args: str, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    """``python -m clusterfs.cli ARGS`` with captured text output."""
    return subprocess.run([*CLUSTERFS, *args], capture_output=True, text=True,
                          timeout=timeout, **kw)


# ----------------------------------------------------------------------------
# running code as another user


def run_as(uid: int, gid: int, cwd: str, fn, *args, timeout: float = 60):
    """Run ``fn(*args)`` in a forked child that has chdir'd to ``cwd`` and then
    dropped to ``uid``/``gid`` (no supplementary groups). Returns its result;
    an exception in the child is re-raised here (OSError keeps its errno).

    The chdir happens as root, so the child reaches a mountpoint below a 0700
    directory (pytest's tmp) through relative paths.
    """
    import pickle  # noqa: PLC0415

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(r)
        try:
            try:
                os.chdir(cwd)
                os.setgroups([])
                os.setgid(gid)
                os.setuid(uid)
                out = ("ok", fn(*args))
            except OSError as e:
                out = ("oserror", (e.errno, e.strerror, e.filename))
            except BaseException as e:  # noqa: BLE001
                out = ("error", repr(e))
            data = pickle.dumps(out)
            with os.fdopen(w, "wb") as f:
                f.write(data)
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    deadline = time.monotonic() + timeout
    while True:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError(f"run_as child {pid} hung")
        time.sleep(0.01)
    kind, val = pickle.loads(data)
    if kind == "ok":
        return val
    if kind == "oserror":
        raise OSError(*val)
    raise AssertionError(f"run_as child failed: {val}")
