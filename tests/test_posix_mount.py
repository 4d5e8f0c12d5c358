"""The mount command's contract (issue 2, item 3): daemonized and foreground
mounts, clean unmount by fusermount3 and by SIGTERM, persistence, and a
second mount of a device in use refused."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import mountutil
import pytest
from mountutil import CLUSTERFS

SIZE = 128 << 20


@pytest.fixture
def device(tmp_path):
    mountutil.require_mounts("clusterfs")
    with mountutil.loop_device(SIZE, tmp_path) as dev:
        mountutil.mkfs(dev)
        yield dev


def _servers_for(mountpoint: str) -> list[int]:
    """pids of clusterfs processes whose command line names this mountpoint (ours:
    the mountpoint is a fresh tmp path)."""
    pids = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if os.fsencode(mountpoint) in argv and b"clusterfs.cli" in argv:
            pids.append(int(pid))
    return pids


def _wait_gone(pids: list[int], timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(os.path.exists(f"/proc/{p}") for p in pids):
            return True
        time.sleep(0.1)
    return False


def test_daemonized_mount_and_fusermount_unmount(device, tmp_path):
    mnt = str(tmp_path / "mnt")
    os.mkdir(mnt)
    r = subprocess.run([*CLUSTERFS, "mount", device, mnt], capture_output=True, text=True,
                       timeout=60)
    pids = _servers_for(mnt)
    try:
        assert r.returncode == 0, r.stderr
        assert mountutil._is_mounted(mnt), "mount returned 0 but the mount is not live"
        assert pids, "no clusterfs server process found for the mount"
        with open(os.path.join(mnt, "f"), "wb") as f:
            f.write(b"daemon")
        u = subprocess.run(["fusermount3", "-u", mnt], capture_output=True, text=True)
        assert u.returncode == 0, u.stderr
        assert _wait_gone(pids), "server still running after fusermount3 -u"
    finally:
        if mountutil._is_mounted(mnt):
            subprocess.run(["fusermount3", "-u", "-z", mnt], capture_output=True)
        for p in pids:
            if os.path.exists(f"/proc/{p}"):
                os.kill(p, signal.SIGKILL)
    assert mountutil.fsck(device).returncode == 0
    with mountutil.mounted(device, mnt) as m:
        with open(m.path("f"), "rb") as f:
            assert f.read() == b"daemon"


def test_sigterm_unmounts_cleanly(device, tmp_path):
    mnt = str(tmp_path / "mnt")
    m = mountutil.start_mount(device, mnt)
    try:
        with open(m.path("f"), "wb") as f:
            f.write(b"term")
        os.mkdir(m.path("d"))
        m.proc.send_signal(signal.SIGTERM)
        rc = m.proc.wait(30)
        assert rc == 0, f"server exited {rc} on SIGTERM:\n{m.log_text()}"
        assert not mountutil._is_mounted(mnt), "SIGTERM: server exited, mount left behind"
        m._forget()
    except BaseException:
        m.force_unmount()
        raise
    r = mountutil.fsck(device)
    assert r.returncode == 0, r.stdout + r.stderr
    with mountutil.mounted(device, mnt) as m:
        with open(m.path("f"), "rb") as f:
            assert f.read() == b"term"
        assert os.path.isdir(m.path("d"))


def test_second_mount_of_same_device_refused(device, tmp_path):
    with mountutil.mounted(device, str(tmp_path / "mnt")) as m:
        other = str(tmp_path / "mnt2")
        os.mkdir(other)
        r = subprocess.run([*CLUSTERFS, "mount", "-f", device, other], capture_output=True,
                           text=True, timeout=30)
        if mountutil._is_mounted(other):
            subprocess.run(["fusermount3", "-u", other], capture_output=True)
        assert r.returncode != 0, "a second mount of a device in use went ahead"
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
        assert not mountutil._is_mounted(other)
        with open(m.path("still"), "wb") as f:     # the first mount is unharmed
            f.write(b"ok")

