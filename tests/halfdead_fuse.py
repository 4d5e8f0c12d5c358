"""A FUSE server that ends up half-dead when SIGKILLed, for the fencing tests.

    python3 tests/halfdead_fuse.py MOUNTPOINT PID_DIR NODE_ID INCARNATION_HEX [--hang]

It mounts MOUNTPOINT and records itself as node NODE_ID in PID_DIR exactly as a
clusterfs mount does with --fence-pid-dir (node<ID>.pid, then node<ID>.mount once
mounted). With --hang, one of its own threads then looks up `hang` on its own
mount, and the server reads that request and never answers it: a request the
server has read is waited for uninterruptibly, so after a SIGKILL that thread stays
in the kernel, the leader becomes a zombie, /dev/fuse is never closed and the
process never goes away, until its FUSE connection is aborted. The same shape as a
killed clusterfs mount whose names worker is stuck in fuse_reverse_inval_entry.
Prints "ready" once the hanging lookup has reached the server (or, without
--hang, once mounted).
"""

from __future__ import annotations

import errno
import os
import sys
import threading

import pyfuse3
import trio

from clusterfs.fence.fuseconn import fuse_mount_at
from clusterfs.fence.pidfile import write_mount_record, write_pid_file


class HangingFs(pyfuse3.Operations):
    def __init__(self) -> None:
        super().__init__()
        self.hanging = trio.Event()

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext | None = None
                      ) -> pyfuse3.EntryAttributes:
        if inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOENT)
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = inode
        attr.st_mode = 0o40755
        attr.st_nlink = 2
        return attr

    async def lookup(self, parent: int, name: bytes, ctx: pyfuse3.RequestContext | None = None
                     ) -> pyfuse3.EntryAttributes:
        if name == b"hang":
            self.hanging.set()
            await trio.sleep_forever()      # read, never answered
        raise pyfuse3.FUSEError(errno.ENOENT)


def look_up_hang(mountpoint: str) -> None:
    try:
        os.stat(os.path.join(mountpoint, "hang"))
    except OSError:
        pass        # ENOTCONN once the connection is aborted


async def serve(mountpoint: str, pid_dir: str, node_id: int, incarnation: int,
                hang: bool) -> None:
    ops = HangingFs()
    pyfuse3.init(ops, mountpoint, set(pyfuse3.default_options) | {"fsname=halfdead"})
    mount = fuse_mount_at(mountpoint)
    assert mount is not None, "our mount is not in mountinfo"
    write_mount_record(pid_dir, node_id, incarnation, mount)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pyfuse3.main)
        if hang:
            threading.Thread(target=look_up_hang, args=(mountpoint,), daemon=True).start()
            await ops.hanging.wait()
        print("ready", mount.conn, flush=True)


def main() -> None:
    mountpoint, pid_dir, node_id, incarnation = sys.argv[1:5]
    write_pid_file(pid_dir, int(node_id), int(incarnation, 16))
    trio.run(serve, os.path.realpath(mountpoint), pid_dir, int(node_id),
             int(incarnation, 16), "--hang" in sys.argv[5:])


if __name__ == "__main__":
    main()
