"""The pyfuse3 Operations adapter. The only place FUSEError is raised.

FUSE inode 1 is the root; every other FUSE inode number (node id) is the inode's block
address, except that in a cluster a directory another node moved while the kernel held
it may be shown under its block address plus an id generation in the high bits
(fuse/names.py). File handles are inode numbers (per-open state lives in the fs layer);
directory handles index a snapshot of the entries taken at opendir.
"""

from __future__ import annotations

import errno
import functools
import itertools
import logging
import os
import stat
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import pyfuse3
import trio
from pyfuse3 import (
    EntryAttributes,
    FileHandleT,
    FileInfo,
    FileNameT,
    FlagT,
    InodeT,
    ModeT,
    ReaddirToken,
    RequestContext,
    SetattrFields,
    StatvfsData,
    XAttrNameT,
)

from clusterfs.errors import ClusterFSError, FSError
from clusterfs.format.block import BLOCK_SIZE
from clusterfs.format.directory import NAME_MAX
from clusterfs.fs.filesystem import FileSystem
from clusterfs.fs.inode import CachedInode
from clusterfs.fs.namespace import RENAME_EXCHANGE
from clusterfs.fuse import attrino
from clusterfs.fuse.attrino import set_attr_ino
from clusterfs.fuse.epoch import KernelEpoch
from clusterfs.fuse.names import INO_MASK, KernelNames, ino_of

log = logging.getLogger(__name__)
ENTRY_TIMEOUT = 1.0
ATTR_TIMEOUT = 1.0
# A missing name is answered as a negative entry (inode 0) that the kernel may cache
# this long instead of asking again; a create or rename through this mount replaces
# it at once. tools/nullfs.py reads this too.
NEGATIVE_TIMEOUT = 1.0
# In a cluster, the kernel caches only what an invalidation can take back without
# deadlock (docs/locking.md, "kernel caches"): attributes, which a demote invalidates
# (invalidate_inode with attr_only never waits on the kernel, and a reply racing the
# invalidation is discarded by the kernel's attr_version check), and, where the kernel
# has FUSE_NOTIFY_INC_EPOCH (Linux 6.16), the names a LOOKUP found: a demote of their
# directory to nothing raises the epoch, which invalidates them taking no lock
# (fuse/epoch.py). Otherwise names are not cached (invalidate_entry would wait for a
# pending lookup in that directory, which waits for the glock being demoted), nor are
# those of readdirplus and creates. File data bypasses the page cache (direct_io:
# invalidating pages waits for page locks a pending read holds).
CLUSTER_ENTRY_TIMEOUT = 0.0
# The I/O size a cluster mount tells programs to use (st_blksize). Its files are
# direct_io: no page cache, no kernel read-ahead, so each read(2) is a request to us;
# stdio, Python's buffered files, cp and cmp size their buffers by st_blksize, and at
# the 4 KiB block size `cmp` of a 256 MiB file read 30 MiB/s (one round trip per 4 KiB).
# 1 MiB: the largest request the kernel sends us (NFS reports its 1 MiB transfer size
# the same way; CephFS and Lustre say 4 MiB). Buffered writers then keep up to 1 MiB
# before write(2), so a program must flush before fsync, as on NFS (README).
CLUSTER_IO_SIZE = 1 << 20
# The directories remembered as having handed names out for caching, at most: past it
# the epoch is raised (every cached name asked for again once) and the set starts anew
NAMES_CACHED_DIRS_MAX = 65536
# Entries a readdirplus handles with one round of locks (about what one reply holds)
READDIR_CHUNK = 256
CLUSTER_CACHED_ENTRY_TIMEOUT = ENTRY_TIMEOUT


def _name_only(ino: int, dtype: int) -> EntryAttributes:
    """A readdirplus entry without attributes: node id 0 tells the kernel to link
    nothing for it (fuse_direntplus_link: "the userspace filesystem did not want to
    return attributes/handle for this entry"), and the dirent still shows the inode
    number (the attributes' st_ino, fuse/attrino.py) and the type (st_mode's)."""
    entry = EntryAttributes()
    entry.st_ino = 0
    set_attr_ino(entry, ino)
    entry.st_mode = dtype << 12
    entry.entry_timeout = 0
    entry.attr_timeout = 0
    return entry


class _EioLog:
    """Says why an operation answered EIO, at most once every EIO_LOG_EVERY seconds
    (with how many were not said): an EIO from our own errors is a device failure, a
    withdraw or a broken rule, and an application sees only the errno. (A stress
    run's create once got EIO on a cluster node that logged nothing.)"""

    def __init__(self) -> None:
        self.said_at = -EIO_LOG_EVERY
        self.unsaid = 0

    def __call__(self, op: str, exc: ClusterFSError) -> None:
        now = time.monotonic()
        if now - self.said_at < EIO_LOG_EVERY:
            self.unsaid += 1
            return
        log.warning("%s: EIO: %s: %s%s", op, type(exc).__name__, exc,
                    f" ({self.unsaid} more EIO answers since the last line)"
                    if self.unsaid else "")
        self.said_at, self.unsaid = now, 0


EIO_LOG_EVERY = 10.0
_eio_log = _EioLog()


def _edge(fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """Turn our exceptions into FUSEError; anything unexpected is logged and is EIO."""
    @functools.wraps(fn)
    async def wrapper(self: Operations, *args: Any, **kwargs: Any) -> Any:
        try:
            return await fn(self, *args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except ClusterFSError as exc:
            if exc.errno == errno.EIO:
                _eio_log(fn.__name__, exc)
            raise pyfuse3.FUSEError(exc.errno) from None
        except OSError as exc:
            log.error("%s: %s", fn.__name__, exc)
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        except Exception:
            log.exception("%s failed", fn.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None
    return wrapper


class Operations(pyfuse3.Operations):
    supports_dot_lookup = False
    enable_writeback_cache = False

    def __init__(self, fs: FileSystem) -> None:
        super().__init__()
        self.fs = fs
        self.root = fs.root
        # fh -> (inode, the node id it was opened under, entries: (name, inode, type))
        self._dir_handles: dict[int, tuple[int, int, list[tuple[bytes, int, int]]]] = {}
        self._next_fh = itertools.count(1)
        # set while the kernel's INIT is handled: a task waiting on it runs once the
        # reply is sent, i.e. once the kernel has applied the mount's settings
        self.initialized = trio.Event()
        self.clustered = fs.clustered
        # a cluster's listings carry names alone (_reply_names), where the entry's
        # inode number can be shown without a node id (fuse/attrino.py)
        self._names_only = fs.clustered and attrino.AVAILABLE
        self.entry_timeout = CLUSTER_ENTRY_TIMEOUT if fs.clustered else ENTRY_TIMEOUT
        self.negative_timeout = CLUSTER_ENTRY_TIMEOUT if fs.clustered else NEGATIVE_TIMEOUT
        fs.kernel_forget.hook = self._invalidate
        # names and directory node ids handed to the kernel (a cluster only: on one
        # node nothing else moves a directory or changes a name)
        self.names: KernelNames | None = None
        # cluster: the kernel may cache the names our LOOKUPs found while the lock of
        # their directory stays here (fuse/epoch.py); the directories (inode numbers)
        # with names handed out for caching since the epoch was last raised
        self.epoch = KernelEpoch()
        self._names_cached_in: set[int] = set()
        if fs.clustered:
            self.names = KernelNames(self._invalidate_entry,
                                     generations=fs.sb.total_blocks <= INO_MASK)
            fs.names_hook = self._take_back_names
            fs.when_withdrawn(self._withdrawn)

    def init(self) -> None:
        if self.names is not None:
            self.names.start()
            self.epoch.start()
        self.initialized.set()

    def close(self) -> None:
        """Before the FUSE session goes: stop the workers that talk to it."""
        if self.names is not None:
            self.names.stop()
        self.epoch.stop()

    # -- numbering ---------------------------------------------------------------
    def _ino(self, fuse_ino: int) -> int:
        """The inode a node id from the kernel stands for (ESTALE: a directory deleted
        since, its block reused, fuse/names.py)."""
        if fuse_ino == pyfuse3.ROOT_INODE:
            return self.root
        if self.names is not None and self.names.is_stale(fuse_ino):
            raise FSError(errno.ESTALE, f"node id {fuse_ino:#x}: directory deleted")
        return ino_of(fuse_ino)

    def _fuse_ino(self, ino: int) -> int:
        """The node id of `ino` when it has only one (not a directory in a cluster)."""
        return pyfuse3.ROOT_INODE if ino == self.root else ino

    def _fuse_inos(self, ino: int) -> tuple[int, ...]:
        """Every node id the kernel may know `ino` by (safe from any thread)."""
        return (self.names.ids(ino) if self.names is not None else ()) or \
            (self._fuse_ino(ino),)

    def _invalidate(self, ino: int) -> None:
        """Forget the inode's attributes (called from a worker thread by a demote)."""
        for fuse_ino in self._fuse_inos(ino):
            try:
                pyfuse3.invalidate_inode(fuse_ino, attr_only=True)
            except Exception as exc:   # the kernel may not know the inode
                log.debug("invalidate %#x: %s", fuse_ino, exc)

    def _invalidate_entry(self, fuse_parent: int, name: bytes) -> None:
        pyfuse3.invalidate_entry(fuse_parent, name)   # (pyfuse3 takes the FUSE numbers)

    def _take_back_names(self, ino: int) -> None:
        """(Directory `ino`'s lock is going to nothing, not gone yet.) Names found in it
        may change elsewhere from now on: if the kernel may cache any, raise the
        epoch, which invalidates every cached name at once (before the lock goes:
        this runs in the demote, before its unlock); and have the unused dentries
        let go."""
        assert self.names is not None
        if ino in self._names_cached_in:
            self._raise_epoch()
        for fuse_ino in self._fuse_inos(ino):
            self.names.take_back(fuse_ino)

    def _raise_epoch(self) -> None:
        """Every name the kernel caches is invalid from now on: no directory has
        handed out a cached name since."""
        self._names_cached_in.clear()
        self.epoch.bump()

    def _withdrawn(self, reason: str) -> None:
        """The node withdrew: the other nodes will replay its journal and go on without
        it. Nothing it cached is to be trusted any more, nor handed out again."""
        if self._names_cached_in:
            self._raise_epoch()
        self.epoch.stop()

    def _entry_id(self, parent_inode: int, name: bytes, node: CachedInode) -> int:
        """The node id to hand `node` to the kernel under, as `name` in `parent_inode`."""
        if self.names is None:
            return self._fuse_ino(node.ino)
        if stat.S_ISDIR(node.d.mode):
            return self.names.directory_id(node.ino, node.d.generation, (parent_inode, name))
        return self.names.file_id(node.ino)

    def _entry(self, parent_inode: InodeT, name: bytes, node: CachedInode,
               cacheable: bool = False) -> EntryAttributes:
        """A positive entry for the kernel, under the node id it should have there;
        remembered so a demote can take it back (and a directory's id counted).
        cacheable: a LOOKUP's answer, found under its directory's lock, which the kernel
        may keep while that lock stays here (see CLUSTER_CACHED_ENTRY_TIMEOUT)."""
        fuse_ino = self._entry_id(parent_inode, name, node)
        if self.names is not None:
            self.names.remember(parent_inode, name,
                                fuse_ino if stat.S_ISDIR(node.d.mode) else None)
        attr = self._attr(node, fuse_ino)
        if cacheable and self.clustered and self.epoch.available:
            # (no await since the lookup let go of the lock: a demote of the
            # directory that raises the epoch comes after this, as it must)
            if len(self._names_cached_in) >= NAMES_CACHED_DIRS_MAX:
                self._raise_epoch()
            self._names_cached_in.add(self._ino(parent_inode))
            attr.entry_timeout = CLUSTER_CACHED_ENTRY_TIMEOUT
        return attr

    def _attr(self, node: CachedInode, fuse_ino: int) -> pyfuse3.EntryAttributes:
        """The attributes of `node`, known to the kernel as `fuse_ino` (every reply
        about one kernel inode carries its id); st_ino is the inode number, also for a
        directory shown under an id of its own (fuse/attrino.py)."""
        d = node.d
        a = pyfuse3.EntryAttributes()
        a.st_ino = fuse_ino
        if fuse_ino > INO_MASK:              # (an id generation in its high bits)
            set_attr_ino(a, ino_of(fuse_ino))
        a.generation = d.generation
        a.entry_timeout = self.entry_timeout
        a.attr_timeout = ATTR_TIMEOUT
        a.st_mode = d.mode
        a.st_nlink = d.nlink
        a.st_uid = d.uid
        a.st_gid = d.gid
        a.st_rdev = d.rdev
        a.st_size = d.size
        a.st_blksize = CLUSTER_IO_SIZE if self.clustered else BLOCK_SIZE
        a.st_blocks = node.owned_block_count() * (BLOCK_SIZE // 512)
        a.st_atime_ns = d.atime * 1_000_000_000 + d.atime_ns
        a.st_mtime_ns = d.mtime * 1_000_000_000 + d.mtime_ns
        a.st_ctime_ns = d.ctime * 1_000_000_000 + d.ctime_ns
        return a

    # -- names -------------------------------------------------------------------
    @_edge
    async def lookup(self, parent_inode: InodeT, name: FileNameT,
                     ctx: RequestContext | None = None) -> EntryAttributes:
        if len(name) > NAME_MAX:
            raise pyfuse3.FUSEError(errno.ENAMETOOLONG)
        node = await self.fs.lookup(self._ino(parent_inode), name)
        if node is None:
            return self._negative()
        return self._entry(parent_inode, name, node, cacheable=True)

    def _negative(self) -> pyfuse3.EntryAttributes:
        """"No such name", cacheable by the kernel (cheaper than raising ENOENT)."""
        a = pyfuse3.EntryAttributes()
        a.st_ino = 0
        a.entry_timeout = self.negative_timeout
        return a

    async def forget(self, inode_list: Sequence[tuple[InodeT, int]]) -> None:
        # FORGET has no reply: pyfuse3 lets an exception from it end the whole session,
        # so nothing may escape (a withdrawn fs cannot free what was unlinked: fsck does)
        for fuse_ino, count in inode_list:
            ino = self.root if fuse_ino == pyfuse3.ROOT_INODE else ino_of(fuse_ino)
            try:
                if self.names is not None:
                    self.names.forgotten(fuse_ino, count)
                await self.fs.forget(ino, count)
            except ClusterFSError as exc:
                log.debug("forget %d: %s", fuse_ino, exc)
            except Exception:
                log.exception("forget %d failed", fuse_ino)

    @_edge
    async def getattr(self, inode: InodeT, ctx: RequestContext | None = None
                      ) -> EntryAttributes:
        return self._attr(await self.fs.getattr(self._ino(inode)), inode)

    @_edge
    async def setattr(self, inode: InodeT, attr: EntryAttributes, fields: SetattrFields,
                      fh: FileHandleT | None, ctx: RequestContext) -> EntryAttributes:
        kw = {}
        if fields.update_mode:
            kw["mode"] = attr.st_mode
        if fields.update_uid:
            kw["uid"] = attr.st_uid
        if fields.update_gid:
            kw["gid"] = attr.st_gid
        if fields.update_size:
            kw["size"] = attr.st_size
        if fields.update_atime:
            kw["atime_ns"] = attr.st_atime_ns
        if fields.update_mtime:
            kw["mtime_ns"] = attr.st_mtime_ns
        if getattr(fields, "update_ctime", False):
            kw["ctime_ns"] = attr.st_ctime_ns
        return self._attr(await self.fs.setattr(self._ino(inode), **kw), inode)

    @_edge
    async def readlink(self, inode: InodeT, ctx: RequestContext) -> bytes:
        return await self.fs.readlink(self._ino(inode))

    @_edge
    async def mknod(self, parent_inode: InodeT, name: FileNameT, mode: ModeT, rdev: int,
                    ctx: RequestContext) -> EntryAttributes:
        node = await self.fs.mknod(self._ino(parent_inode), name, mode, rdev, ctx.uid, ctx.gid)
        return self._entry(parent_inode, name, node)

    @_edge
    async def mkdir(self, parent_inode: InodeT, name: FileNameT, mode: ModeT,
                    ctx: RequestContext) -> EntryAttributes:
        node = await self.fs.mknod(self._ino(parent_inode), name,
                                   stat.S_IFDIR | stat.S_IMODE(mode), 0, ctx.uid, ctx.gid)
        return self._entry(parent_inode, name, node)

    @_edge
    async def symlink(self, parent_inode: InodeT, name: FileNameT, target: FileNameT,
                      ctx: RequestContext) -> EntryAttributes:
        node = await self.fs.mknod(self._ino(parent_inode), name, stat.S_IFLNK | 0o777, 0,
                                   ctx.uid, ctx.gid, target=target)
        return self._entry(parent_inode, name, node)

    @_edge
    async def create(self, parent_inode: InodeT, name: FileNameT, mode: ModeT, flags: FlagT,
                     ctx: RequestContext) -> tuple[FileInfo, EntryAttributes]:
        parent = self._ino(parent_inode)
        while True:
            try:
                node = await self.fs.mknod(parent, name, stat.S_IFREG | stat.S_IMODE(mode), 0,
                                           ctx.uid, ctx.gid, open_it=True)
                return self._file_info(node.ino), self._entry(parent_inode, name, node)
            except FSError as exc:
                if exc.errno != errno.EEXIST or flags & os.O_EXCL:
                    raise
            # Created elsewhere (another node) since the kernel's negative lookup: without
            # O_EXCL, open(O_CREAT) opens what is there, as on a local filesystem, where
            # the directory lock spans the lookup and the create.
            found = await self.fs.lookup(parent, name)
            if found is None:
                continue                 # and gone again: create it after all
            if not stat.S_ISREG(found.d.mode):
                await self.fs.forget(found.ino, 1)
                raise pyfuse3.FUSEError(errno.EISDIR if found.dir is not None else errno.EEXIST)
            node = await self.fs.open(found.ino)
            if flags & os.O_TRUNC and node.d.size:
                await self.fs.truncate(node.ino, 0)
            return self._file_info(node.ino), self._entry(parent_inode, name, node)

    def _file_info(self, ino: int) -> FileInfo:
        if self.clustered:
            return pyfuse3.FileInfo(fh=ino, direct_io=True)
        return pyfuse3.FileInfo(fh=ino, keep_cache=True)

    @_edge
    async def link(self, inode: InodeT, new_parent_inode: InodeT, new_name: FileNameT,
                   ctx: RequestContext) -> EntryAttributes:
        node = await self.fs.link(self._ino(inode), self._ino(new_parent_inode), new_name)
        return self._entry(new_parent_inode, new_name, node)

    @_edge
    async def unlink(self, parent_inode: InodeT, name: FileNameT, ctx: RequestContext) -> None:
        await self.fs.unlink(self._ino(parent_inode), name)

    @_edge
    async def rmdir(self, parent_inode: InodeT, name: FileNameT, ctx: RequestContext) -> None:
        await self.fs.unlink(self._ino(parent_inode), name, want_dir=True)

    @_edge
    async def rename(self, parent_inode_old: InodeT, name_old: FileNameT,
                     parent_inode_new: InodeT, name_new: FileNameT, flags: FlagT,
                     ctx: RequestContext) -> None:
        await self.fs.rename(self._ino(parent_inode_old), name_old,
                             self._ino(parent_inode_new), name_new, flags)
        if self.names is not None:       # the kernel moves its dentry (or swaps two)
            self.names.remember(parent_inode_new, name_new)
            self.names.remember(parent_inode_old, name_old)
            self.names.renamed((parent_inode_old, name_old), (parent_inode_new, name_new),
                               exchange=bool(flags & RENAME_EXCHANGE))

    # -- files ---------------------------------------------------------------------
    @_edge
    async def open(self, inode: InodeT, flags: FlagT, ctx: RequestContext) -> FileInfo:
        node = await self.fs.open(self._ino(inode))
        if flags & os.O_TRUNC and node.d.size:
            await self.fs.truncate(node.ino, 0)
        return self._file_info(node.ino)

    @_edge
    async def read(self, fh: FileHandleT, off: int, size: int) -> bytes | memoryview:
        return await self.fs.read(fh, off, size)

    @_edge
    async def write(self, fh: FileHandleT, off: int, buf: bytes) -> int:
        return await self.fs.write(fh, off, buf)

    # No flush(): the base class answers ENOSYS, after which the kernel stops sending
    # FLUSH on every close (one request less per open/close; nothing to do there
    # without a writeback cache). nullfs does the same.

    @_edge
    async def release(self, fh: FileHandleT) -> None:
        await self.fs.release(fh)

    @_edge
    async def fsync(self, fh: FileHandleT, datasync: bool) -> None:
        await self.fs.fsync(fh, datasync)

    # -- directories -----------------------------------------------------------------
    @_edge
    async def opendir(self, inode: InodeT, ctx: RequestContext) -> FileHandleT:
        ino = self._ino(inode)
        entries = await self.fs.listing(ino)
        fh = next(self._next_fh)
        self._dir_handles[fh] = (ino, inode, entries)
        return fh

    @_edge
    async def readdir(self, fh: FileHandleT, start_id: int, token: ReaddirToken) -> None:
        parent, fuse_parent, entries = self._dir_handles.get(fh, (0, 0, []))
        reply = self._reply_names if self._names_only else self._reply_entries
        for first in range(start_id, len(entries), READDIR_CHUNK):
            if not await reply(parent, fuse_parent, entries[first : first + READDIR_CHUNK],
                               first, token):
                return

    async def _reply_entries(self, parent: int, fuse_parent: int,
                             chunk: list[tuple[bytes, int, int]], first: int,
                             token: ReaddirToken) -> bool:
        """Readdirplus entries with their attributes; False once the reply is full."""
        # (one round of locks for the chunk; no await from here to the next one)
        nodes = await self.fs.readdir_nodes(parent, [(n, c) for n, c, _t in chunk])
        for index, (name, child, _t), node in zip(itertools.count(first), chunk, nodes):
            if node is None:
                continue   # removed since opendir
            # readdirplus makes a dentry of each entry, under the directory's
            # dentry of the node id it was opened under
            fuse_ino = self._entry_id(fuse_parent, name, node)
            if not pyfuse3.readdir_reply(token, name, self._attr(node, fuse_ino), index + 1):
                return False
            self.fs.count_lookup(child, node.d.generation)
            if self.names is not None:
                self.names.remember(fuse_parent, name,
                                    fuse_ino if stat.S_ISDIR(node.d.mode) else None)
        return True

    async def _reply_names(self, parent: int, fuse_parent: int,
                           chunk: list[tuple[bytes, int, int]], first: int,
                           token: ReaddirToken) -> bool:
        """(A cluster.) Readdirplus entries that carry a name, inode number and type
        alone, checked under the directory's lock only: each entry's inode is neither
        locked nor read. A cluster's kernel keeps no name a readdirplus hands it
        (CLUSTER_ENTRY_TIMEOUT; docs/locking.md, "Kernel caches in a cluster"), so a
        stat after a listing is a LOOKUP anyway, which takes the inode's lock itself;
        attributes here would cost a lock per entry (of another node's directory, a
        round of lock requests per reply) for nothing. The inodes are brought in in
        the background instead (FileSystem.warm_listed), for the stats that often
        follow: `ls` waits for none of it, `ls -l` as long as before."""
        listed = await self.fs.still_listed(parent, [(n, c) for n, c, _t in chunk])
        named: list[int] = []
        try:
            for index, (name, child, dtype), ok in zip(itertools.count(first), chunk,
                                                       listed):
                if not ok:
                    continue
                if not pyfuse3.readdir_reply(token, name, _name_only(child, dtype),
                                             index + 1):
                    return False
                named.append(child)
            return True
        finally:
            self.fs.warm_listed(named)

    @_edge
    async def releasedir(self, fh: FileHandleT) -> None:
        self._dir_handles.pop(fh, None)

    @_edge
    async def fsyncdir(self, fh: FileHandleT, datasync: bool) -> None:
        await self.fs.fsync(self.root)     # one journal: a commit covers every directory

    # -- xattrs ------------------------------------------------------------------------
    # trusted.* needs CAP_SYS_ADMIN; FUSE passes only the uid, so root stands for it.
    @staticmethod
    def _check_trusted(name: bytes, ctx: RequestContext | None, err: int) -> None:
        if name.startswith(b"trusted.") and ctx is not None and ctx.uid != 0:
            raise pyfuse3.FUSEError(err)

    @_edge
    async def setxattr(self, inode: InodeT, name: XAttrNameT, value: bytes,
                       ctx: RequestContext) -> None:
        self._check_trusted(name, ctx, errno.EPERM)
        await self.fs.setxattr(self._ino(inode), name, value)

    @_edge
    async def getxattr(self, inode: InodeT, name: XAttrNameT, ctx: RequestContext) -> bytes:
        self._check_trusted(name, ctx, errno.ENODATA)
        return await self.fs.getxattr(self._ino(inode), name)

    @_edge
    async def listxattr(self, inode: InodeT, ctx: RequestContext) -> Sequence[XAttrNameT]:
        return await self.fs.listxattr(self._ino(inode), ctx is None or ctx.uid == 0)

    @_edge
    async def removexattr(self, inode: InodeT, name: XAttrNameT, ctx: RequestContext) -> None:
        self._check_trusted(name, ctx, errno.EPERM)
        await self.fs.removexattr(self._ino(inode), name)

    # -- whole fs ---------------------------------------------------------------------
    @_edge
    async def statfs(self, ctx: RequestContext) -> StatvfsData:
        usage = await self.fs.usage()
        s = pyfuse3.StatvfsData()
        s.f_bsize = BLOCK_SIZE
        s.f_frsize = BLOCK_SIZE
        s.f_blocks = usage.blocks
        s.f_bfree = usage.free
        s.f_bavail = usage.free
        s.f_files = usage.blocks
        s.f_ffree = usage.free
        s.f_favail = usage.free
        s.f_namemax = NAME_MAX
        return s
