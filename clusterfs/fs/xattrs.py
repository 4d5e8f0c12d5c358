"""Xattrs: extended attributes, inline in the inode block while they fit, else in
an xattr block of their own (user, trusted and security namespaces).

A mixin of FileSystem (fs/filesystem.py), split out by noun: its methods use the
filesystem's state and plumbing (`_hold`, `_inode`, `txn`, `glocks`, ...).
"""

from __future__ import annotations

import errno

from clusterfs.errors import FSError
from clusterfs.format.inode import (
    XATTR_BLOCK_MAX,
    encode_xattrs,
)
from clusterfs.fs.inode import CachedInode

XATTR_NAMESPACES = (b"user.", b"trusted.", b"security.")


class Xattrs:
    # ================================================================ xattrs
    async def getxattr(self, ino: int, name: bytes) -> bytes:
        async with self._hold(pr=[ino], write=False):
            value = self._inode(ino).d.xattrs.get(name)
            if value is None:
                raise FSError(errno.ENODATA)
            return value

    async def listxattr(self, ino: int, privileged: bool = True) -> list[bytes]:
        """Names; trusted.* only for a privileged caller (as Linux does)."""
        async with self._hold(pr=[ino], write=False):
            names = list(self._inode(ino).d.xattrs)
        return names if privileged else [n for n in names if not n.startswith(b"trusted.")]

    async def setxattr(self, ino: int, name: bytes, value: bytes) -> None:
        if not name.startswith(XATTR_NAMESPACES):
            raise FSError(errno.ENOTSUP)
        if len(name) > 255 or len(value) > 65536:
            raise FSError(errno.ERANGE)

        def frees() -> list[int]:
            blk = self._inode(ino).d.xattr_blk
            return [blk] if blk else []

        async def run(alloc):
            async with self._hold(ex=[ino], alloc=alloc, frees=frees):
                node = self._inode(ino)
                new = dict(node.d.xattrs)
                new[name] = value
                self._store_xattrs(node, new)

        await self._retrying(run, ino, 1)

    async def removexattr(self, ino: int, name: bytes) -> None:
        def frees() -> list[int]:
            blk = self._inode(ino).d.xattr_blk
            return [blk] if blk else []

        async with self._hold(ex=[ino], frees=frees):
            node = self._inode(ino)
            if name not in node.d.xattrs:
                raise FSError(errno.ENODATA)
            new = dict(node.d.xattrs)
            del new[name]
            self._store_xattrs(node, new)

    def _store_xattrs(self, node: CachedInode, xattrs: dict[bytes, bytes]) -> None:
        size = len(encode_xattrs(xattrs))
        if size > XATTR_BLOCK_MAX:
            raise FSError(errno.ENOSPC, "xattrs do not fit in one block")
        old = node.d.xattrs
        node.d.xattrs = xattrs
        if node.xattrs_fit_inline():
            if node.d.xattr_blk:
                self._release(node.d.xattr_blk, 1)
                node.d.xattr_blk = 0
        elif not node.d.xattr_blk:
            try:
                node.d.xattr_blk = self._reserve(node.ino, 1)[0]
            except FSError:
                node.d.xattrs = old
                raise
        node.touch(m=False)
        self._dirty(node)
