"""What a mount does at start so that its failover path needs nothing from the host.

Taking over from a dead node or a silent server (membership, fencing, DLM
recovery, journal replay, a proxy's re-target) must open no host file and import
nothing (../shared/ARCHITECTURE.md, "Memory discipline"; docs/recovery.md, "What
the failover path asks of the host"). Most of it is loaded anyway by the time a
mount serves; this makes sure of the rest, once, before the node joins:

- every module of the layers on that path is imported (`FAILOVER_PACKAGES`), and
  the standard-library modules their rare branches would import (`STDLIB`);
- the codecs a name lookup or a message would load are looked up (a first
  `getaddrinfo` of a str host imports encodings.idna, stringprep, unicodedata);
- log records with a traceback are formatted without source lines
  (`TracebackFormatter`): the standard formatter reads them through linecache,
  which opens every .py file of the stack the first time;
- every thread started from then on gets a WORKER_STACK stack, not the 8 MiB
  default (`bound_thread_stacks`): under mlockall each new stack is faulted in whole
  at once (measured: 8.1 MiB of RSS per thread; 1.1 MiB with this bound; threads of
  ours, `failover.start_thread`, take 0.6 MiB). A mount's blocking calls run on the
  worker threads node/memory.py starts with this stack (clusterfs/workers.py); trio's
  own workers, which start whenever none is idle, remain for whatever calls trio
  directly.

The pieces that hold host resources (the generation record's descriptor, the
process agent's pidfds, the device's write-behind) are taken where they are made;
this module only loads code.
"""

from __future__ import annotations

import importlib
import logging
import pkgutil
import socket
import threading
import traceback
from types import TracebackType

log = logging.getLogger("clusterfs.mount")

# the layers the failover path runs through (clusterfs/__init__.py has the table)
FAILOVER_PACKAGES = ("clusterfs.wire", "clusterfs.comms", "clusterfs.membership",
                     "clusterfs.fence", "clusterfs.dlm", "clusterfs.storage",
                     "clusterfs.journal", "clusterfs.cache")
# imported by standard-library code only on a branch a failover may take
STDLIB = ("encodings.idna", "encodings.ascii", "encodings.latin_1", "stringprep",
          "unicodedata", "linecache", "tokenize", "traceback", "logging.handlers",
          "json", "zlib", "hmac", "hashlib", "selectors", "queue", "concurrent.futures")
# The stack of every thread a mount starts after preload (trio's workers, which run
# the journal's flushes, libiscsi and fencing calls, getaddrinfo): none of it recurses
# deeply, and 1 MiB is twice our own threads' (failover.THREAD_STACK), for code not ours.
WORKER_STACK = 1 << 20


def preload() -> list[str]:
    """Import everything the failover path may need; the modules that could not be
    imported (an optional backend not built here: they cannot be used either)."""
    names = list(STDLIB)
    for package in FAILOVER_PACKAGES:
        module = importlib.import_module(package)
        names += [info.name for info in pkgutil.iter_modules(module.__path__, package + ".")]
    missing = [name for name in names if not _try_import(name)]
    _warm_codecs()
    bound_thread_stacks()
    if missing:
        log.debug("not loaded (not available here): %s", ", ".join(missing))
    return missing


def bound_thread_stacks() -> None:
    """Threads started from now on get WORKER_STACK (module doc)."""
    threading.stack_size(WORKER_STACK)


def _try_import(name: str) -> bool:
    try:
        importlib.import_module(name)
    except ImportError:
        return False
    return True


def _warm_codecs() -> None:
    """Look up, once, what a connection to a peer and a log message look up."""
    for codec in ("idna", "ascii", "latin-1", "utf-8"):
        "clusterfs".encode(codec)
    socket.getaddrinfo("127.0.0.1", 0, type=socket.SOCK_STREAM)


class TracebackFormatter(logging.Formatter):
    """A logging formatter whose tracebacks name file, line and function but quote no
    source: quoting it opens the source files (linecache), on whatever path logged."""

    def formatException(self, ei) -> str:  # noqa: N802 - logging's name
        return "\n".join(_traceback_lines(ei[1], ei[2], set()))


def _traceback_lines(exc: BaseException | None, tb: TracebackType | None,
                     seen: set[int]) -> list[str]:
    if exc is None:
        return []
    seen.add(id(exc))
    lines: list[str] = []
    cause = exc.__cause__
    chained = cause or (None if exc.__suppress_context__ else exc.__context__)
    if chained is not None and id(chained) not in seen:
        lines += _traceback_lines(chained, chained.__traceback__, seen)
        lines.append("\nThe above exception was the direct cause of the following exception:\n"
                     if cause is not None else
                     "\nDuring handling of the above exception, another exception occurred:\n")
    lines.append("Traceback (most recent call last):")
    for frame, lineno in traceback.walk_tb(tb):
        code = frame.f_code
        lines.append(f'  File "{code.co_filename}", line {lineno}, in {code.co_name}')
    lines += [line.rstrip("\n") for line in traceback.format_exception_only(type(exc), exc)]
    for i, sub in enumerate(getattr(exc, "exceptions", ()), start=1):   # a group's
        lines.append(f"  +-- {i} --")
        lines += ["  " + line for line in _traceback_lines(sub, sub.__traceback__, seen)]
    return lines
