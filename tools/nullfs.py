#!/usr/bin/env python3
"""nullfs: a do-nothing pyfuse3 filesystem, the ceiling Python FUSE allows.

Writes are accepted and discarded (only the file size is kept), reads return
zeros up to the file's size, creates are recorded in a dict. It exists so
tools/bench.py can tell how much of clusterfs's time is its own and how much is
FUSE + pyfuse3 + trio.

    python3 tools/nullfs.py [--writeback] MOUNTPOINT

It serves in the foreground until unmounted (fusermount3 -u) or sent SIGTERM /
SIGINT. It mounts with the same FUSE options, init flags, timeouts (negative
entries too), FLUSH handling and mount read-ahead that clusterfs uses (read from
clusterfs.fuse and clusterfs.node.mount_cmd when they declare them, see
``_clusterfs_fuse_settings``), so the comparison is fair.
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import stat
import sys
import time

import pyfuse3
import trio

ROOT = pyfuse3.ROOT_INODE
BLOCK = 4096


def _clusterfs_fuse_settings() -> dict:
    """The FUSE settings clusterfs's adapter uses (clusterfs/fuse/operations.py and
    clusterfs/node/mount_cmd.py), with fallbacks if they cannot be imported:
    mount options default_permissions + allow_other, no writeback cache,
    1 s entry/attr timeouts, keep_cache on open."""
    settings = {"options": set(pyfuse3.default_options) | {"allow_other"},
                "writeback": False, "entry_timeout": 1.0, "attr_timeout": 1.0,
                "negative_timeout": 0.0, "flush": True, "raise_readahead": None}
    try:
        from clusterfs.fuse import operations as cf  # noqa: PLC0415
    except Exception:
        return settings
    settings["writeback"] = bool(getattr(cf.Operations, "enable_writeback_cache", False))
    settings["entry_timeout"] = float(getattr(cf, "ENTRY_TIMEOUT", 1.0))
    settings["attr_timeout"] = float(getattr(cf, "ATTR_TIMEOUT", 1.0))
    settings["negative_timeout"] = float(getattr(cf, "NEGATIVE_TIMEOUT", 0.0))
    # clusterfs without a flush() handler answers ENOSYS and the kernel stops sending FLUSH
    settings["flush"] = "flush" in vars(cf.Operations)
    try:
        from clusterfs.node import mount_cmd  # noqa: PLC0415
        settings["raise_readahead"] = mount_cmd._raise_readahead
    except Exception:
        pass
    return settings


SETTINGS = _clusterfs_fuse_settings()


class Node:
    __slots__ = ("ino", "mode", "size", "nlink", "uid", "gid", "atime", "mtime", "ctime",
                 "children", "target")

    def __init__(self, ino: int, mode: int, uid: int = 0, gid: int = 0):
        now = time.time_ns()
        self.ino = ino
        self.mode = mode
        self.size = 0
        self.nlink = 2 if stat.S_ISDIR(mode) else 1
        self.uid, self.gid = uid, gid
        self.atime = self.mtime = self.ctime = now
        self.children: dict[bytes, int] | None = {} if stat.S_ISDIR(mode) else None
        self.target = b""


class NullFS(pyfuse3.Operations):
    supports_dot_lookup = True

    def __init__(self, writeback: bool = False):
        super().__init__()
        self.enable_writeback_cache = writeback
        self.nodes: dict[int, Node] = {ROOT: Node(ROOT, stat.S_IFDIR | 0o755)}
        self.next_ino = ROOT + 1
        self.initialized = trio.Event()       # as clusterfs: set while INIT is handled

    def init(self):
        self.initialized.set()

    # -- helpers
    def _attr(self, n: Node) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = n.ino
        a.st_mode = n.mode
        a.st_nlink = n.nlink
        a.st_uid, a.st_gid = n.uid, n.gid
        a.st_size = n.size
        a.st_blksize = BLOCK
        a.st_blocks = 0
        a.st_atime_ns, a.st_mtime_ns, a.st_ctime_ns = n.atime, n.mtime, n.ctime
        a.generation = 0
        a.entry_timeout = SETTINGS["entry_timeout"]
        a.attr_timeout = SETTINGS["attr_timeout"]
        return a

    def _node(self, ino: int) -> Node:
        try:
            return self.nodes[ino]
        except KeyError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None

    def _new(self, parent: int, name: bytes, mode: int, ctx) -> Node:
        d = self._node(parent)
        if name in d.children:
            raise pyfuse3.FUSEError(errno.EEXIST)
        n = Node(self.next_ino, mode, ctx.uid, ctx.gid)
        self.next_ino += 1
        self.nodes[n.ino] = n
        d.children[name] = n.ino
        if stat.S_ISDIR(mode):
            d.nlink += 1
        d.mtime = d.ctime = time.time_ns()
        return n

    # -- operations
    async def lookup(self, parent_inode, name, ctx=None):
        d = self._node(parent_inode)
        if name == b".":
            return self._attr(d)
        ino = d.children.get(name)
        if ino is None:
            if SETTINGS["negative_timeout"]:
                a = pyfuse3.EntryAttributes()     # a cacheable miss, as clusterfs answers
                a.st_ino = 0
                a.entry_timeout = SETTINGS["negative_timeout"]
                return a
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(self.nodes[ino])

    async def getattr(self, inode, ctx=None):
        return self._attr(self._node(inode))

    async def setattr(self, inode, attr, fields, fh, ctx):
        n = self._node(inode)
        if fields.update_size:
            n.size = attr.st_size
        if fields.update_mode:
            n.mode = (n.mode & ~0o7777) | (attr.st_mode & 0o7777)
        if fields.update_uid:
            n.uid = attr.st_uid
        if fields.update_gid:
            n.gid = attr.st_gid
        if fields.update_atime:
            n.atime = attr.st_atime_ns
        if fields.update_mtime:
            n.mtime = attr.st_mtime_ns
        n.ctime = time.time_ns()
        return self._attr(n)

    async def create(self, parent_inode, name, mode, flags, ctx):
        n = self._new(parent_inode, name, stat.S_IFREG | (mode & 0o7777), ctx)
        return pyfuse3.FileInfo(fh=n.ino, keep_cache=True), self._attr(n)

    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        return self._attr(self._new(parent_inode, name, mode, ctx))

    async def mkdir(self, parent_inode, name, mode, ctx):
        return self._attr(self._new(parent_inode, name, stat.S_IFDIR | (mode & 0o7777), ctx))

    async def symlink(self, parent_inode, name, target, ctx):
        n = self._new(parent_inode, name, stat.S_IFLNK | 0o777, ctx)
        n.target = target
        n.size = len(target)
        return self._attr(n)

    async def readlink(self, inode, ctx):
        return self._node(inode).target

    async def unlink(self, parent_inode, name, ctx):
        d = self._node(parent_inode)
        ino = d.children.pop(name, None)
        if ino is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        n = self.nodes[ino]
        n.nlink -= 1
        if n.nlink == 0:
            del self.nodes[ino]

    async def rmdir(self, parent_inode, name, ctx):
        d = self._node(parent_inode)
        ino = d.children.get(name)
        if ino is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        if self.nodes[ino].children:
            raise pyfuse3.FUSEError(errno.ENOTEMPTY)
        del d.children[name]
        del self.nodes[ino]
        d.nlink -= 1

    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        src, dst = self._node(parent_inode_old), self._node(parent_inode_new)
        ino = src.children.get(name_old)
        if ino is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        old = dst.children.get(name_new)
        if old is not None:
            if self.nodes[old].children:
                raise pyfuse3.FUSEError(errno.ENOTEMPTY)
            self.nodes.pop(old, None)
        del src.children[name_old]
        dst.children[name_new] = ino

    async def open(self, inode, flags, ctx):
        n = self._node(inode)
        if flags & os.O_TRUNC:
            n.size = 0
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)

    async def read(self, fh, off, size):
        n = self.nodes[fh]
        if off >= n.size:
            return b""
        return bytes(min(size, n.size - off))

    async def write(self, fh, off, buf):
        n = self.nodes[fh]
        end = off + len(buf)
        if end > n.size:
            n.size = end
        return len(buf)

    async def flush(self, fh):
        if not SETTINGS["flush"]:
            raise pyfuse3.FUSEError(errno.ENOSYS)   # as clusterfs: no more FLUSH requests

    async def fsync(self, fh, datasync):
        pass

    async def release(self, fh):
        pass

    async def opendir(self, inode, ctx):
        self._node(inode)
        return inode

    async def readdir(self, fh, start_id, token):
        d = self.nodes[fh]
        items = list(d.children.items())
        for i in range(start_id, len(items)):
            name, ino = items[i]
            if not pyfuse3.readdir_reply(token, name, self._attr(self.nodes[ino]), i + 1):
                break

    async def releasedir(self, fh):
        pass

    async def fsyncdir(self, fh, datasync):
        pass

    async def statfs(self, ctx):
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = BLOCK
        s.f_blocks = s.f_bfree = s.f_bavail = 1 << 30
        s.f_files = 1 << 30
        s.f_ffree = s.f_favail = (1 << 30) - len(self.nodes)
        s.f_namemax = 255
        return s


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("mountpoint")
    p.add_argument("--writeback", action=argparse.BooleanOptionalAction, default=None,
                   help="kernel writeback cache (default: as clusterfs does)")
    args = p.parse_args(argv)
    opts = set(SETTINGS["options"]) | {"fsname=nullfs", "subtype=nullfs"}
    writeback = SETTINGS["writeback"] if args.writeback is None else args.writeback
    fs = NullFS(writeback=writeback)
    # resolved before mounting: once mounted, this process must never stat its own
    # mountpoint (the request would wait for this very process)
    mountpoint = os.path.realpath(args.mountpoint)
    pyfuse3.init(fs, mountpoint, opts)

    async def raise_readahead():
        # the same mount read-ahead clusterfs sets, at the same moment: right after
        # the kernel has our INIT reply
        await fs.initialized.wait()
        SETTINGS["raise_readahead"](mountpoint)

    async def serve():
        async with trio.open_nursery() as nursery:
            async def fuse_main():
                await pyfuse3.main()          # returns when unmounted (fusermount3 -u)
                nursery.cancel_scope.cancel()
            nursery.start_soon(fuse_main)
            if SETTINGS["raise_readahead"] is not None:
                nursery.start_soon(raise_readahead)
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    break

    try:
        trio.run(serve)
    finally:
        pyfuse3.close(unmount=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
