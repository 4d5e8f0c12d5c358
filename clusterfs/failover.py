"""The failover path of this process: which of its phases are under way, and an
opt-in audit of what the process asks of the host meanwhile.

A node that takes over from a dead node or a silent server must not need the host
to do it (../shared/ARCHITECTURE.md, "Memory discipline"; seeds 002 and 003): a
file opened, a module imported or a process started there may wait on memory the
kernel is trying to free by writing back through us. So every layer marks its
phase of that path, with a name, while it runs:

    failover.enter("membership")      # a member of our view went silent ... fenced
    failover.leave("membership")

(`PHASES` lists the names in use and who marks them.) A mark is a flag in a dict:
cheap, safe from any thread, a no-op when nothing audits. This module imports only
the standard library, so every layer may use it.

From the first phase entered to the last one left runs one *path* (phases overlap:
membership fences, then journal recovery replays). A mount gives a meter
(`set_meter`): counters of what the process drew from the kernel (heap bytes, arenas,
threads), read when a path starts and when it ends, and kept with the path
(`path_history`), so a failover that needed fresh memory says so; and a listener
told when a path starts and ends (the mount hands pymalloc its reserve of arenas
meanwhile: node/memory.py).

The audit (`install_audit`, which `clusterfs mount` runs when the environment has
CLUSTERFS_AUDIT_FAILOVER=1) adds a `sys.addaudithook` hook that records every
event of `AUDITED` (files opened, modules imported, processes and code started,
names looked up) into memory: those that happen while a phase is under way in
`during`, the others only counted and sampled, so a test can see that the hook
was there at all. Nothing is written anywhere: `report()` hands it to whoever asks
(the mount's status socket). Events are recorded only once `arm_audit()` was
called (the mount does it when it is live): what a mount does while it starts is
no failover, even if one is under way in the cluster meanwhile.
"""

from __future__ import annotations

import collections
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

# phase name -> who marks it, from when to when
PHASES = {
    "membership": "membership (proposals.py, promises.py): from a member of our view "
                  "going silent, or a promise of a view without it, until no member is "
                  "silent and no removed node waits to be fenced",
    "journal recovery": "cache/recovery.py: from a view that removed nodes until their "
                        "journals are replayed here (covers DLM recovery, which it waits for)",
    "proxy re-target": "storage/proxy.py: from a block server found silent until a "
                       "request has completed on another one",
    "lock recovery": "node/lockd_cmd.py (clusterfs lockd only): from a view that removed "
                     "a node until the lockspace runs again (DLM recovery done)",
}

# the events that mean "needs the host": audit event names, or prefixes ending in "."
AUDITED = ("open", "import", "exec", "compile", "subprocess.Popen", "os.system", "os.exec",
           "os.fork", "os.forkpty", "os.posix_spawn", "os.spawn", "os.listdir", "os.scandir",
           "os.mkdir", "os.rename", "os.remove", "os.rmdir", "os.truncate", "os.chmod",
           "os.chown", "os.link", "os.symlink", "os.utime", "os.chdir", "ctypes.dlopen",
           "socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyaddr",
           "socket.getnameinfo", "shutil.", "tempfile.", "glob.")

# A thread of ours gets a stack this size, not the 8 MiB default (ulimit -s): under
# mlockall(MCL_FUTURE) every page of a new thread's stack is faulted in and locked at
# once, so each default thread costs 8 MiB of locked memory the moment it starts. Our
# threads run shallow Python and short C calls (syscalls, libiscsi, cffi): 512 KiB
# leaves them a wide margin (trio's worker threads are left at the default: what
# they run is not ours to bound).
THREAD_STACK = 512 << 10
_stack_lock = threading.Lock()

DURING_LIMIT = 1000      # events kept that happened during a phase (then only counted)
SAMPLE = 20              # events kept that happened outside every phase (the latest)
HISTORY = 100            # phases kept, the latest

_under_way: dict[str, float] = {}          # phase -> since (time.monotonic)
_history: collections.deque[dict[str, Any]] = collections.deque(maxlen=HISTORY)

Meter = Callable[[], dict[str, int]]
_meter: Meter | None = None
_listener: Callable[[bool], None] | None = None
_path_lock = threading.Lock()              # a path starts and ends once, whoever marks
_path: dict[str, Any] | None = None        # the path under way: since, phases, meter then
_paths: collections.deque[dict[str, Any]] = collections.deque(maxlen=HISTORY)


def set_meter(meter: Meter | None, listener: Callable[[bool], None] | None = None) -> None:
    """Read `meter` when a path starts and ends; tell `listener` (True, then False)."""
    global _meter, _listener
    _meter, _listener = meter, listener


def enter(phase: str) -> None:
    """`phase` of the failover path is under way here (from now, if it was not)."""
    if phase in _under_way:
        return
    with _path_lock:
        if not _under_way:
            _start_path()
        _under_way[phase] = time.monotonic()
        if _path is not None and phase not in _path["phases"]:
            _path["phases"].append(phase)


def leave(phase: str) -> None:
    """`phase` is over (if it was under way)."""
    with _path_lock:
        since = _under_way.pop(phase, None)
        if since is None:
            return
        _history.append({"phase": phase, "at": round(time.time(), 3),
                         "seconds": round(time.monotonic() - since, 4)})
        if not _under_way:
            _end_path()


def _start_path() -> None:
    global _path
    if _listener is not None:
        _listener(True)
    _path = {"since": time.monotonic(), "phases": [],
             "meter": _meter() if _meter is not None else {}}


def _end_path() -> None:
    global _path
    path, _path = _path, None
    if path is None:
        return
    now = _meter() if _meter is not None else {}
    _paths.append({"at": round(time.time(), 3), "phases": path["phases"],
                   "seconds": round(time.monotonic() - path["since"], 4),
                   "drawn": {k: v - path["meter"].get(k, 0) for k, v in now.items()}})
    if _listener is not None:
        _listener(False)


def path_history() -> list[dict[str, Any]]:
    """The last paths that ended: end, length, phases, and what the meter's counters
    grew by meanwhile (`drawn`), oldest first."""
    return list(_paths)


def under_way() -> tuple[str, ...]:
    return tuple(_under_way)


def start_thread(target: Callable[[], None], name: str, *, daemon: bool = True,
                 stack: int = THREAD_STACK) -> threading.Thread:
    """Start a thread of ours with a `stack` stack (THREAD_STACK). The size is a process-wide
    setting read when a thread starts: it is set and put back around our start only
    (under a lock, so two of ours never undo each other's)."""
    thread = threading.Thread(target=target, name=name, daemon=daemon)
    with _stack_lock:
        before = threading.stack_size(stack)
        try:
            thread.start()
        finally:
            threading.stack_size(before)
    return thread


def phase_history() -> list[dict[str, Any]]:
    """The last phases that ended (name, wall-clock end, length), oldest first."""
    return list(_history)


class _Audit:
    """What the hook saw. Appends (atomic under the GIL) and counters, no lock: two
    threads counting at once may lose a count, which misleads nobody."""

    def __init__(self) -> None:
        self.installed_at = time.time()
        self.armed = False
        self.seen = 0                     # audited events since install, armed or not
        self.during: list[dict[str, Any]] = []
        self.during_dropped = 0
        self.outside: collections.deque[dict[str, Any]] = collections.deque(maxlen=SAMPLE)
        self.outside_count = 0
        self.busy = threading.local()     # the hook never audits itself

    def hook(self, event: str, args: tuple[Any, ...]) -> None:
        if getattr(self.busy, "on", False) or not _audited(event, args):
            return
        self.busy.on = True
        try:
            self._record(event, args)
        except Exception:  # noqa: BLE001, S110 - an audit hook must never fail the caller
            pass
        finally:
            self.busy.on = False

    def _record(self, event: str, args: tuple[Any, ...]) -> None:
        self.seen += 1
        if not self.armed:
            return
        phases = tuple(_under_way)
        entry = {"event": event, "what": _describe(event, args), "phases": list(phases),
                 "thread": threading.current_thread().name, "at": round(time.time(), 3)}
        if not phases:
            self.outside_count += 1
            self.outside.append(entry)
        elif len(self.during) < DURING_LIMIT:
            self.during.append(entry)
        else:
            self.during_dropped += 1
            return
        entry["where"] = _caller()

    def report(self) -> dict[str, Any]:
        return {"installed": True, "installed_at": round(self.installed_at, 3),
                "armed": self.armed, "seen": self.seen, "during": list(self.during),
                "during_dropped": self.during_dropped, "outside_count": self.outside_count,
                "outside_sample": list(self.outside), "under_way": list(_under_way),
                "phases": phase_history(), "paths": path_history()}


def _audited(event: str, args: tuple[Any, ...]) -> bool:
    if event in _NAME_LOOKUPS and args and _numeric_address(args[0]):
        return False     # no lookup at all: glibc makes no syscall for it (strace)
    return any(event == name or (name.endswith(".") and event.startswith(name))
               for name in AUDITED)


_NAME_LOOKUPS = ("socket.getaddrinfo", "socket.gethostbyname")


def _numeric_address(host: object) -> bool:
    if isinstance(host, bytes):
        host = host.decode("ascii", "replace")
    if not isinstance(host, str):
        return False
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, host)
            return True
        except OSError:
            continue
    return False


def _describe(event: str, args: tuple[Any, ...]) -> str:
    """The event's first argument (the path, the module name; an open's mode too), short."""
    shown = args[:2] if event == "open" else args[:1]
    return " ".join(repr(a) for a in shown)[:200]


def _caller() -> list[str]:
    """file:line function of the frames that led to the event (innermost first), found
    through an exception's traceback: sys._getframe is itself an audited event."""
    try:
        raise RuntimeError
    except RuntimeError as exc:
        frame = exc.__traceback__.tb_frame if exc.__traceback__ else None
    out = []
    while frame is not None and len(out) < 15:
        code = frame.f_code
        name = code.co_filename.rsplit("/", 2)
        out.append(f"{'/'.join(name[-2:])}:{frame.f_lineno} {code.co_name}")
        frame = frame.f_back
    return out[3:]          # without _caller, _record and hook


_audit: _Audit | None = None


def install_audit() -> None:
    """Add the audit hook to this process (once; a hook cannot be removed)."""
    global _audit
    if _audit is None:
        _audit = _Audit()
        sys.addaudithook(_audit.hook)


def arm_audit() -> None:
    """From now on, record (what came before is only counted)."""
    if _audit is not None:
        _audit.armed = True


def report() -> dict[str, Any]:
    """What the audit saw, for the status socket; {"installed": False} without it."""
    if _audit is None:
        return {"installed": False, "under_way": list(_under_way),
                "phases": phase_history(), "paths": path_history()}
    return _audit.report()
