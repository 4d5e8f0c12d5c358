"""Shared pytest fixtures for real-mount tests (see tests/mountutil.py).

Fixtures
--------
``fs_kind``      parametrized over the filesystems under test: "clusterfs" and
                 "ext4" (ext4 proves the test itself is right). Restrict with
                 ``CLUSTERFS_TEST_FS=ext4`` (comma-separated list) while developing.
``loop``         factory: ``loop(size_bytes) -> "/dev/loopN"``, detached at teardown.
``fsys``         a freshly formatted, mounted filesystem of kind ``fs_kind`` on
                 its own loop device: ``fsys.root`` is the mountpoint,
                 ``fsys.remount()`` unmounts cleanly and mounts again.
                 Device size: ``@pytest.mark.device_size(bytes)`` (default 256 MiB).
                 At teardown it unmounts and runs fsck, which must be clean
                 (``@pytest.mark.no_fsck`` to opt out).
``cfs``          the same, always clusterfs (for clusterfs-only tests).

Anything a test leaves behind (mount, loop device, server process) is torn
down at session end, and reported.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

# Every subprocess a test starts (`python -m clusterfs.cli`, node processes, workloads) imports
# clusterfs from this checkout, whatever its cwd and whichever checkout pip installed.
_CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (_CHECKOUT, os.environ.get("PYTHONPATH", "")) if p)

import mountutil  # noqa: E402

DEFAULT_DEVICE_SIZE = 256 << 20


def _fs_kinds() -> list[str]:
    want = os.environ.get("CLUSTERFS_TEST_FS", "")
    if not want:
        return list(mountutil.FS_KINDS)
    kinds = [k.strip() for k in want.split(",") if k.strip()]
    bad = [k for k in kinds if k not in mountutil.FS_KINDS]
    if bad:
        raise pytest.UsageError(f"CLUSTERFS_TEST_FS: unknown fs {bad}")
    return kinds


def pytest_configure(config):
    config.addinivalue_line("markers", "device_size(n): size in bytes of the fsys loop device")
    config.addinivalue_line("markers", "journals(n): mkfs -j for the fsys fixture")
    config.addinivalue_line("markers", "no_fsck: skip the fsck the fsys fixture runs at teardown")


def pytest_sessionstart(session):
    # SIGTERM / SIGHUP would kill pytest without teardown, leaving mounts and loop
    # devices; turn them into KeyboardInterrupt, which pytest tears down after.
    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")
    for sig in (signal.SIGTERM, signal.SIGHUP):
        with contextlib.suppress(ValueError):   # not the main thread
            signal.signal(sig, interrupt)


def pytest_generate_tests(metafunc):
    if "fs_kind" in metafunc.fixturenames:
        metafunc.parametrize("fs_kind", _fs_kinds())


def pytest_sessionfinish(session, exitstatus):
    leaked = mountutil.cleanup_all()
    if leaked:
        tr = session.config.pluginmanager.get_plugin("terminalreporter")
        if tr is not None:
            tr.write_line(f"mountutil: cleaned up leftovers: {', '.join(leaked)}", red=True)


@pytest.fixture
def loop(tmp_path):
    """Factory: ``loop(size_bytes, name="disk.img") -> device path``."""
    mountutil.require_mounts("ext4")
    count = 0
    with contextlib.ExitStack() as stack:
        def make(size_bytes: int, name: str | None = None) -> str:
            nonlocal count
            count += 1
            n = name or f"disk{count}.img"
            return stack.enter_context(mountutil.loop_device(size_bytes, tmp_path, n))
        yield make


class FsUnderTest:
    """A formatted device and its mount, remountable within one test."""

    def __init__(self, fs: str, device: str, tmp_path, journals: int | None = None):
        self.fs = fs
        self.device = device
        self.tmp_path = tmp_path
        self.root = str(tmp_path / "mnt")
        self.journals = journals
        self.mnt: mountutil.Mount | None = None

    def mkfs(self) -> None:
        mountutil.mkfs(self.device, journals=self.journals, fs=self.fs,
                       force=self.fs == "clusterfs")

    def mount(self) -> mountutil.Mount:
        assert self.mnt is None, "already mounted"
        self.mnt = mountutil.start_mount(self.device, self.root, self.fs)
        return self.mnt

    def unmount(self) -> None:
        m, self.mnt = self.mnt, None
        if m is not None:
            m.unmount()

    def remount(self) -> mountutil.Mount:
        self.unmount()
        return self.mount()

    def fsck(self, repair: bool = False):
        assert self.mnt is None, "fsck needs the filesystem unmounted"
        return mountutil.fsck(self.device, repair=repair, fs=self.fs)

    def path(self, *parts: str) -> str:
        return os.path.join(self.root, *parts)

    def close(self, failed: bool) -> None:
        m, self.mnt = self.mnt, None
        if m is None:
            return
        if failed:
            m.force_unmount()
        else:
            m.unmount()


def _make_fsys(fs, request, tmp_path):
    mountutil.require_mounts(fs)
    size = DEFAULT_DEVICE_SIZE
    if (mk := request.node.get_closest_marker("device_size")) is not None:
        size = int(mk.args[0])
    journals = None
    if (mk := request.node.get_closest_marker("journals")) is not None:
        journals = int(mk.args[0])
    with mountutil.loop_device(size, tmp_path) as dev:
        f = FsUnderTest(fs, dev, tmp_path, journals)
        ok = False
        try:
            f.mkfs()
            f.mount()
            yield f
            ok = True
        finally:
            f.close(failed=not ok)
        # every test also proves it left a consistent disk behind
        if request.node.get_closest_marker("no_fsck") is None:
            r = f.fsck()
            assert r.returncode == 0, (f"fsck of {fs} after the test is not clean "
                                       f"({r.returncode}):\n{r.stdout}{r.stderr}")


@pytest.fixture
def fsys(fs_kind, request, tmp_path):
    yield from _make_fsys(fs_kind, request, tmp_path)


@pytest.fixture
def cfs(request, tmp_path):
    yield from _make_fsys("clusterfs", request, tmp_path)


@pytest.fixture
def cluster3(tmp_path):
    """Three `clusterfs lockd` processes on 127.0.0.1 (LocalLockCluster), all running."""
    from clusterfs.node.lockbench_cmd import LocalLockCluster

    with LocalLockCluster([1, 2, 3], workdir=str(tmp_path), verbose=True) as cl:
        cl.start_all()
        yield cl

