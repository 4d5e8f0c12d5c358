"""A private iSCSI target for tests: our own tgtd on 127.0.0.1, torn down whatever happens.

``target(workdir, sizes)`` starts ``tgtd -f`` with its own portal (a free TCP port on
127.0.0.1) and its own control port (tgtd's management socket is
/var/run/tgtd/socket.<port>, so another tgtd on this machine is never addressed),
creates one target with a fresh sparse backing file per LUN (LUN 1, 2, ...), lets
only initiators from 127.0.0.1 in, and on exit SIGKILLs that tgtd by its pid (tgtd
ignores SIGTERM) and removes its socket files. The tgtd process also gets SIGKILL
from the kernel if the test process dies first (PR_SET_PDEATHSIG), and ``atexit``
kills any still registered, so a failed or interrupted run leaves none behind.

``t.add_portal()`` has the target listen on one more portal (tgtadm's portal mode:
every portal of a tgtd is in one portal group), and ``relay(port)`` starts a TCP
relay (tests/tcprelay.py) in front of a portal, so that a test can stop a path
(SIGSTOP) or break it (SIGKILL); relays are killed by pid at the end like tgtd.

Like mountutil, this never imports clusterfs: the device under test is reached only
through the URL it prints.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import random
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

TGTD_DIR = "/var/run/tgtd"
START_TIMEOUT = 15.0
RELAY = Path(__file__).with_name("tcprelay.py")
_LIVE: dict[int, Target | Relay] = {}   # pid -> target or relay still running


def missing_prerequisites() -> str | None:
    if os.geteuid() != 0:
        return "iSCSI tests need root (tgtd)"
    for tool in ("tgtd", "tgtadm"):
        if shutil.which(tool) is None:
            return f"{tool} not installed (apt-get install tgt)"
    try:
        import clusterfs._iscsi  # noqa: F401, PLC0415
    except ImportError:
        return "clusterfs._iscsi not built (libiscsi-dev missing at install?)"
    return None


@dataclass
class Target:
    iqn: str
    portal_port: int
    control_port: int
    workdir: Path
    proc: subprocess.Popen
    backing: dict[int, Path] = field(default_factory=dict)   # lun -> backing file
    owns_control: bool = False     # its socket files are ours to remove (it made them)

    extra_ports: list[int] = field(default_factory=list)   # add_portal()'s

    def url(self, lun: int = 1) -> str:
        return f"iscsi://127.0.0.1:{self.portal_port}/{self.iqn}/{lun}"

    def multi_url(self, ports: list[int], lun: int = 1, query: str = "") -> str:
        """A URL naming the portals 127.0.0.1:PORT of `ports`, in that order."""
        portals = ",".join(f"127.0.0.1:{p}" for p in ports)
        return f"iscsi://{portals}/{self.iqn}/{lun}" + (f"?{query}" if query else "")

    def add_portal(self) -> int:
        """Listen on one more portal (a free port of 127.0.0.1); its port."""
        port = _free_tcp_port()
        self.tgtadm("--mode", "portal", "--op", "new", "--param", f"portal=127.0.0.1:{port}")
        self.extra_ports.append(port)
        return port

    def tgtadm(self, *args: str) -> subprocess.CompletedProcess:
        r = subprocess.run(["tgtadm", "-C", str(self.control_port), "--lld", "iscsi", *args],
                           capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            raise AssertionError(f"tgtadm {' '.join(args)} failed ({r.returncode}): "
                                 f"{r.stderr.strip()}\ntgtd log:\n{self.log_text()}")
        return r

    def log_text(self) -> str:
        try:
            return (self.workdir / "tgtd.log").read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL our tgtd (by pid) and reap it; idempotent."""
        _kill_and_reap(self.proc)
        if not self.owns_control:      # e.g. it exited at start: another tgtd's port
            return
        self.owns_control = False
        for name in (f"socket.{self.control_port}", f"socket.{self.control_port}.lock"):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(TGTD_DIR, name))

    def stop(self) -> None:
        """SIGSTOP our tgtd: the connection stays up, nothing is answered."""
        os.kill(self.proc.pid, signal.SIGSTOP)


def _kill_and_reap(proc: subprocess.Popen) -> None:
    """SIGKILL one of our processes by its pid (tgtd ignores SIGTERM), reap it and
    forget it; idempotent."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    _LIVE.pop(proc.pid, None)


def bounded(fn, *args, bound: float):
    """fn(*args) in a helper thread: its result, or its exception raised here; the test
    fails (instead of hanging: a call stuck inside libiscsi ignores signals) if it
    takes longer than `bound` seconds."""
    out: dict = {}

    def run() -> None:
        try:
            out["value"] = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            out["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(bound)
    if t.is_alive():
        pytest.fail(f"{getattr(fn, '__name__', fn)} still hangs after {bound} s")
    if "error" in out:
        raise out["error"]
    return out["value"]


class Relay:
    """A tests/tcprelay.py process in front of 127.0.0.1:`upstream`, listening on
    `port`. stop()/resume() SIGSTOP/SIGCONT it; kill() SIGKILLs it by pid."""

    def __init__(self, upstream: int) -> None:
        self.upstream = upstream
        self.proc = subprocess.Popen([sys.executable, str(RELAY), f"127.0.0.1:{upstream}"],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     text=True, start_new_session=True,
                                     preexec_fn=_die_with_parent)
        _LIVE[self.proc.pid] = self
        line = self.proc.stdout.readline().split()
        if line[:1] != ["port"]:
            self.kill()
            raise AssertionError(f"tcprelay did not start: {line}")
        self.port = int(line[1])
        self.closed = 0

    def stop(self) -> None:
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)

    def wait_closed(self, count: int = 1, timeout: float = 60.0) -> None:
        """Wait until `count` relayed connections have ended in all (each `closed`
        line says both its directions are done: what it held was delivered or
        refused). AssertionError after `timeout` s."""
        deadline = time.monotonic() + timeout
        while self.closed < count:
            ready, _, _ = select.select([self.proc.stdout], [], [], 0.2)
            if ready:
                line = self.proc.stdout.readline()
                if not line:
                    raise AssertionError("tcprelay exited")
                self.closed += line.strip() == "closed"
            if time.monotonic() > deadline:
                raise AssertionError(f"tcprelay: {self.closed} of {count} connections "
                                     f"closed after {timeout} s")

    def kill(self) -> None:
        _kill_and_reap(self.proc)


@contextlib.contextmanager
def relay(upstream: int) -> Iterator[Relay]:
    """A running relay to 127.0.0.1:`upstream`, SIGKILLed at the end whatever happens."""
    r = Relay(upstream)
    try:
        yield r
    finally:
        r.kill()


def _kill_all() -> None:
    for t in list(_LIVE.values()):
        with contextlib.suppress(Exception):
            t.kill()


atexit.register(_kill_all)


def _free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _free_control_port() -> int:
    for _ in range(100):
        port = random.randint(1000, 32767)      # tgtd takes at most 32767
        if not os.path.exists(os.path.join(TGTD_DIR, f"socket.{port}")) and \
                not os.path.exists(os.path.join(TGTD_DIR, f"socket.{port}.lock")):
            return port
    raise AssertionError(f"no free tgtd control port in {TGTD_DIR}")


def _die_with_parent() -> None:
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _start(workdir: Path, iqn: str, attempts: int = 3) -> Target:
    """A ready tgtd; on a clash over a port (another tgtd started meanwhile), new ports."""
    for attempt in range(1, attempts + 1):
        try:
            return _start_once(workdir, iqn)
        except _ExitedAtStart:
            if attempt == attempts:
                raise
    raise AssertionError("unreachable")


class _ExitedAtStart(AssertionError):
    pass


def _start_once(workdir: Path, iqn: str) -> Target:
    portal, control = _free_tcp_port(), _free_control_port()
    logf = open(workdir / "tgtd.log", "ab")  # noqa: SIM115 - tgtd keeps it; closed below
    try:
        proc = subprocess.Popen(
            ["tgtd", "-f", "-C", str(control), "--iscsi", f"portal=127.0.0.1:{portal}"],
            stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
            start_new_session=True, preexec_fn=_die_with_parent)
    finally:
        logf.close()
    t = Target(iqn, portal, control, workdir, proc)
    _LIVE[proc.pid] = t
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if proc.poll() is not None:
            t.kill()
            raise _ExitedAtStart(f"tgtd exited {proc.returncode} at start:\n{t.log_text()}")
        ok = subprocess.run(["tgtadm", "-C", str(control), "--lld", "iscsi", "--mode",
                             "target", "--op", "show"], capture_output=True).returncode == 0
        if ok:
            with contextlib.suppress(OSError), \
                    socket.create_connection(("127.0.0.1", portal), timeout=1):
                if proc.poll() is None:    # it answered, not another tgtd on that port
                    t.owns_control = True
                    return t
        if time.monotonic() > deadline:
            t.kill()
            raise AssertionError(f"tgtd not ready after {START_TIMEOUT}s:\n{t.log_text()}")
        time.sleep(0.05)


@contextlib.contextmanager
def target(sizes: list[int], blocksize: int | None = None,
           workdir: str | os.PathLike | None = None) -> Iterator[Target]:
    """A running target with one LUN per size (LUN 1 first), backed by sparse files in
    `workdir` (default: a new /tmp/iscsi-* directory, removed at the end)."""
    own = workdir is None
    wd = Path(tempfile.mkdtemp(prefix="iscsi-", dir="/tmp") if own else workdir)
    iqn = f"iqn.2025-01.io.clusterfs.test:t{os.getpid()}-{random.randrange(1 << 30)}"
    t = None
    try:
        t = _start(wd, iqn)
        t.tgtadm("--mode", "target", "--op", "new", "--tid", "1", "--targetname", iqn)
        for lun, size in enumerate(sizes, start=1):
            backing = wd / f"lun{lun}.img"
            with open(backing, "wb") as f:
                f.truncate(size)
            extra = ["--blocksize", str(blocksize)] if blocksize else []
            t.tgtadm("--mode", "logicalunit", "--op", "new", "--tid", "1", "--lun", str(lun),
                     "--backing-store", str(backing), *extra)
            t.backing[lun] = backing
        t.tgtadm("--mode", "target", "--op", "bind", "--tid", "1",
                 "--initiator-address", "127.0.0.1")
        yield t
    finally:
        if t is not None:
            t.kill()
        if own:
            shutil.rmtree(wd, ignore_errors=True)
