"""The kernel's name cache in a cluster (tier 3, real mounts; fuse/epoch.py).

Where the kernel has FUSE_NOTIFY_INC_EPOCH (Linux 6.16), the names a LOOKUP found are
cached by the kernel while their directory's lock stays on the node, and a demote of
that lock to nothing raises the epoch before the lock goes. The first test shows that a
name is really cached (a stat is answered while the node's server is frozen); the
second that every change another node makes to a cached name is seen by the next
syscall (a missed epoch raise fails it).
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import threading

import mountutil
import pytest
from clusterutil import cluster

pytestmark = pytest.mark.skipif(mountutil.missing_prerequisites() is not None,
                                reason=str(mountutil.missing_prerequisites()))

NAME_CACHE_ON = "kernel name cache: on"


def _skip_unless_name_cache(c, node: int) -> None:
    if NAME_CACHE_ON not in c.mounts[node].log_text():
        pytest.skip("the kernel has no FUSE_NOTIFY_INC_EPOCH (Linux < 6.16): names "
                    "are not cached")


@contextlib.contextmanager
def _frozen(pid: int):
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def _stat_within(path: str, seconds: float) -> os.stat_result | None:
    """os.stat(path) in a thread; None if it did not return within `seconds` (it then
    returns once the server answers)."""
    result: list[os.stat_result] = []
    worker = threading.Thread(target=lambda: result.append(os.stat(path)), daemon=True)
    worker.start()
    worker.join(seconds)
    return result[0] if result else None


def test_a_looked_up_name_is_answered_by_the_kernel_alone(tmp_path):
    with cluster(tmp_path, nodes=2) as c:
        os.mkdir(c.path(1, "d"))
        with open(c.path(1, "d", "f"), "wb") as f:
            f.write(b"x")
        _skip_unless_name_cache(c, 2)
        path = c.path(2, "d", "f")
        for _attempt in range(3):       # (a second is short on a loaded machine)
            first = os.stat(path)       # LOOKUPs of d and f: cached for a second
            with _frozen(c.mounts[2].pid):
                again = _stat_within(path, 0.5)
            if again is not None:
                break
        # (uncached, the path walk asks the frozen server again and waits)
        assert again is not None, "the stat waited for the server: names not cached"
        assert (again.st_ino, again.st_size) == (first.st_ino, 1)


def _absent(path: str) -> bool:
    try:
        os.stat(path)
    except FileNotFoundError:
        return True
    return False


def test_changes_to_cached_names_are_seen_by_the_next_syscall(tmp_path):
    with cluster(tmp_path, nodes=3) as c:
        a, b = (lambda *p: c.path(1, *p)), (lambda *p: c.path(2, *p))
        os.mkdir(a("d"))
        os.mkdir(a("d", "sub"))
        os.mkdir(a("e"))
        for name in ("f", "g", "h", os.path.join("sub", "x")):
            with open(a("d", name), "wb") as f:
                f.write(name.encode())
        _skip_unless_name_cache(c, 2)

        def cache() -> None:            # node 2 looks every name up (cached a second)
            for name in ("f", "g", "h", os.path.join("sub", "x")):
                with contextlib.suppress(FileNotFoundError):
                    os.stat(b("d", name))

        cache()
        os.rename(a("d", "f"), a("d", "f2"))           # renamed in its directory
        assert _absent(b("d", "f"))
        assert os.stat(b("d", "f2")).st_size == 1
        cache()
        os.unlink(a("d", "g"))                          # removed
        assert _absent(b("d", "g"))
        cache()
        h_ino = os.stat(b("d", "h")).st_ino
        os.rename(a("d", "f2"), a("d", "h"))            # replaced by another file
        assert os.stat(b("d", "h")).st_ino != h_ino
        with open(b("d", "h"), "rb") as f:
            assert f.read() == b"f"
        cache()
        os.rename(a("d", "sub"), a("e", "sub"))         # its directory moved away
        assert _absent(b("d", "sub", "x"))
        assert _absent(b("d", "sub"))
        with open(b("e", "sub", "x"), "rb") as f:
            assert f.read() == b"sub/x"
        os.stat(b("e", "sub", "x"))
        with open(a("e", "sub", "y"), "wb"):           # a name appears next to cached ones
            pass
        assert sorted(os.listdir(b("e", "sub"))) == ["x", "y"]
        os.unlink(a("e", "sub", "x"))
        with pytest.raises(OSError) as err:
            open(b("e", "sub", "x"), "rb")
        assert err.value.errno == errno.ENOENT
