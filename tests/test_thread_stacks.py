"""Threads on the failover path under mlockall (issue 8, item 6): a thread started
after `mlockall(MCL_FUTURE)` has its whole stack faulted in and locked at once, so
with the 8 MiB default every worker trio starts when none is idle costs 8 MiB. After
preload (node/prepare.py) a mount's threads get WORKER_STACK, and the threads of our
own (the device's write-behind, the block server's I/O threads) THREAD_STACK.
Measured in a child process: mlockall changes the whole process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = textwrap.dedent("""
    import json, sys, tempfile, threading, time
    import trio
    from clusterfs.native import lock_memory
    from clusterfs.node.prepare import preload
    from clusterfs.storage.device import BlockDevice

    def rss_kib():
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1])

    try:
        lock_memory()
    except OSError as exc:
        print(json.dumps({"skip": str(exc)}))
        sys.exit(0)
    preload()
    out = {}
    release = threading.Event()

    async def workers():
        before = rss_kib()
        async with trio.open_nursery() as n:
            for _ in range(4):                  # none idle: trio starts four
                n.start_soon(trio.to_thread.run_sync, release.wait)
            await trio.sleep(0.3)
            out["trio worker"] = (rss_kib() - before) / 4
            release.set()

    trio.run(workers)
    with tempfile.NamedTemporaryFile() as f:
        f.truncate(1 << 20)
        dev = BlockDevice(f.name)
        before = rss_kib()
        dev.start_write_behind()               # its thread, mapped staging buffer
        time.sleep(0.3)
        out["write-behind"] = rss_kib() - before
        dev.close()
    print(json.dumps(out))
""")


def test_threads_started_after_preload_do_not_lock_8_mib_stacks():
    """Measured here: before, 8 340 KiB per trio worker and 12 436 KiB for the
    write-behind thread with its 4 MiB staging buffer; now 1 172 and 4 756."""
    proc = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": ROOT}, check=False)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    if "skip" in out:
        pytest.skip(f"mlockall refused here: {out['skip']}")
    assert out["trio worker"] < 2048, out                 # KiB per thread
    assert out["write-behind"] < 4096 + 2048, out         # staging buffer + stack
