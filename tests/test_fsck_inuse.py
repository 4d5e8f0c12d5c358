"""fsck's "is the device in use?" check must never touch other filesystems.

It scans every process's open files. Following those links with stat() would
send a request into whatever FUSE filesystem a file lives on, and a stopped or
busy FUSE server would then hang fsck, for a device that has nothing to do
with it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import mountutil
import pytest

HOLDER = "import sys, time; f = open(sys.argv[1], 'w'); print('open', flush=True); time.sleep(600)"


@pytest.fixture
def frozen_fuse_file(tmp_path):
    """A file held open by another process on a FUSE mount whose server is SIGSTOPped.

    Not held by the test process itself: its forks (to run fsck) would close the
    descriptor on exec, and that close waits on the stopped server.
    """
    mountutil.require_mounts("null")
    with mountutil.mounted("none", str(tmp_path / "mnt"), fs="null") as m:
        holder = subprocess.Popen([sys.executable, "-c", HOLDER,
                                   os.path.join(m.mountpoint, "held")],
                                  stdout=subprocess.PIPE, text=True)
        try:
            assert holder.stdout is not None and holder.stdout.readline() == "open\n"
            os.kill(m.proc.pid, signal.SIGSTOP)
            try:
                time.sleep(1.5)   # past the attr cache: a stat now needs the server
                yield holder.pid
            finally:
                os.kill(m.proc.pid, signal.SIGCONT)
        finally:
            holder.kill()
            holder.wait()


def test_fsck_ignores_files_open_on_a_stopped_fuse_mount(tmp_path, frozen_fuse_file):
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(256 << 20)
    mountutil.mkfs(str(image))
    try:
        r = mountutil.run_cli("fsck", str(image), timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("fsck hung on a file open on a stopped FUSE mount")
    assert r.returncode == 0, r.stdout + r.stderr
