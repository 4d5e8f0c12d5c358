"""A stand-in `clusterfs` command for tests/test_devcluster.py's lifecycle tests.

It takes the cluster mount's command line (`mount -f --config CFG --node-id K
--fence-pid-dir DIR --state-dir DIR DEVICE MOUNTPOINT`) and serves tools/nullfs.py
at MOUNTPOINT, holding DEVICE open as a real node would: no data is shared, but
starting, mounting, SIGTERM, kill -9, dead mounts and unmounting behave as they
will with real nodes, so tools/devcluster's process, mount and loop-device
handling is tested before `clusterfs mount` joins clusters. `mkfs` drops
`--cluster NAME`; `umount` is `fusermount3 -u`; `status` answers one line;
anything else runs the real `python3 -m clusterfs.cli`.

Faults, by environment: DEVCLUSTER_FAKE_FAIL=K makes node K exit 1 at start;
DEVCLUSTER_FAKE_SLOW=K makes node K sleep instead of mounting;
DEVCLUSTER_FAKE_STUCK=K makes node K ignore SIGTERM and hang once unmounted;
DEVCLUSTER_FAKE_HUNG=K makes node K ignore SIGTERM and never answer a getattr (a
stat of its mountpoint blocks in the kernel until it dies, and keeps it busy);
DEVCLUSTER_FAKE_MUTE=1 makes `status` fail as when no node answers;
DEVCLUSTER_FAKE_OLD=1 makes `mount` the single-node one from before cluster
mounts: no --config.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))


def mount(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="clusterfs mount")
    p.add_argument("-f", "--foreground", action="store_true")
    p.add_argument("--config", required=True)
    p.add_argument("--node-id", type=int, required=True)
    p.add_argument("--fence-pid-dir")
    p.add_argument("--state-dir")
    p.add_argument("device")
    p.add_argument("mountpoint")
    args = p.parse_args(argv)
    if os.environ.get("DEVCLUSTER_FAKE_FAIL") == str(args.node_id):
        print(f"fake clusterfs mount: node {args.node_id} refuses to start (fault injected)",
              file=sys.stderr)
        return 1
    if os.environ.get("DEVCLUSTER_FAKE_SLOW") == str(args.node_id):
        print(f"fake clusterfs mount: node {args.node_id} never mounts (fault injected)",
              file=sys.stderr, flush=True)
        while True:
            time.sleep(60)
    import pyfuse3
    import trio
    from nullfs import SETTINGS, NullFS

    class HungFS(NullFS):
        async def getattr(self, inode, ctx=None):
            await trio.sleep_forever()

    hung = os.environ.get("DEVCLUSTER_FAKE_HUNG") == str(args.node_id)
    device = os.open(args.device, os.O_RDONLY)   # a holder of the device, as a node is
    mountpoint = os.path.realpath(args.mountpoint)
    opts = set(SETTINGS["options"]) | {"fsname=devclfake", "subtype=devclfake"}
    pyfuse3.init((HungFS if hung else NullFS)(writeback=False), mountpoint, opts)
    print(f"fake node {args.node_id} serving {mountpoint}", file=sys.stderr, flush=True)

    async def serve() -> None:
        async with trio.open_nursery() as nursery:
            async def fuse_main() -> None:
                await pyfuse3.main()
                nursery.cancel_scope.cancel()
            nursery.start_soon(fuse_main)
            if hung:
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
                return
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    break

    try:
        trio.run(serve)
    finally:
        pyfuse3.close(unmount=True)
    if os.environ.get("DEVCLUSTER_FAKE_STUCK") == str(args.node_id):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print(f"fake node {args.node_id}: unmounted, now hanging (fault injected)",
              file=sys.stderr, flush=True)
        while True:
            time.sleep(60)
    os.close(device)
    return 0


def old_mount(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="clusterfs mount")
    p.add_argument("-f", "--foreground", action="store_true")
    p.add_argument("-o", dest="options", action="append", default=[])
    p.add_argument("--log", metavar="FILE")
    p.add_argument("device")
    p.add_argument("mountpoint")
    p.parse_args(argv)
    print("fake clusterfs mount: the single-node mount is not faked", file=sys.stderr)
    return 1


def main() -> int:
    argv = sys.argv[1:]
    if argv[:1] == ["mount"]:
        return old_mount(argv[1:]) if os.environ.get("DEVCLUSTER_FAKE_OLD") else mount(argv[1:])
    if argv[:1] == ["umount"]:
        return subprocess.run(["fusermount3", "-u", argv[-1]]).returncode
    if argv[:1] == ["status"]:
        if os.environ.get("DEVCLUSTER_FAKE_MUTE"):
            print("clusterfs status: cannot reach the node (fault injected)", file=sys.stderr)
            return 1
        print("fake status: " + " ".join(argv[1:]))
        return 0
    if argv[:1] == ["mkfs"] and "--cluster" in argv:
        i = argv.index("--cluster")
        del argv[i:i + 2]
    return subprocess.run([sys.executable, "-m", "clusterfs.cli", *argv]).returncode


if __name__ == "__main__":
    sys.exit(main())
