"""OpenFiles: this node's open counts (kept apart from the cached inode, which a
demote may drop) and, in a cluster, the ("iopen", ino) lock that tells whoever
drops the last link, or closes last, whether another node still has the file
open.

A mixin of FileSystem (fs/filesystem.py), split out by noun: its methods use the
filesystem's state and plumbing (`_hold`, `_inode`, `txn`, `glocks`, ...).
"""

from __future__ import annotations

import errno

import trio

from clusterfs.dlm.interface import Mode
from clusterfs.errors import FSError, WouldBlock
from clusterfs.fs.inode import CachedInode


class OpenFiles:
    # ================================================================ open files
    async def open(self, ino: int) -> CachedInode:
        while True:
            await self._iopen_hold(ino)
            try:
                async with self._hold(pr=[ino], write=False):
                    if self.clustered and ino not in self.iopen:
                        # the last close of an earlier open here (or a failed open) let
                        # the iopen lock go while this one waited for the inode's lock:
                        # counted open without it, another node's unlink would free the
                        # file under us. Take it again first.
                        continue
                    node = self._inode(ino)
                    self.opens[ino] = self.opens.get(ino, 0) + 1
                    return node
            except BaseException:
                if not self.opens.get(ino):
                    await self._iopen_release(ino)
                raise

    async def release(self, ino: int) -> None:
        left = self.opens.get(ino, 0) - 1
        if left > 0:
            self.opens[ino] = left
            return
        self.opens.pop(ino, None)
        if self.clustered:
            self._iopen_owed.discard(ino)          # (never taken: nobody else could see it)
            await self._iopen_release(ino)
            if ino not in self._unguarded_in:
                # (one made here with no lock of its own yet still has its name: only
                # this node can reach it, and an unlink would have taken its lock)
                await self._reap_if_unlinked(ino)
        else:
            await self._maybe_free(ino)

    # ================================================================ iopen (cluster)
    # A node that has an inode open holds ("iopen", ino) in PR (one lock for all its
    # opens, taken before the inode lock, as everywhere). Whoever drops the last link,
    # or closes last, tries it in EX: granted means no node has it open, so it frees
    # the inode; refused means another node does, and that node's last close (which
    # releases its PR first, then tries) frees it. Two last closers at once cannot both
    # fail: the second try sees no PR left.

    async def _iopen_hold(self, ino: int) -> None:
        if not self.clustered:
            return
        while ino not in self.iopen:
            pending = self._iopen_pending.get(ino)
            if pending is not None:
                await pending.wait()
                continue
            self._iopen_pending[ino] = done = trio.Event()
            try:
                self.iopen[ino] = await self.glocks.locks.lock(("iopen", ino), Mode.PR)
            finally:
                del self._iopen_pending[ino]
                done.set()

    async def _settle_iopen(self, ino: int) -> None:
        """Take the ("iopen", ino) PR a create left owed (mknod: while only this node
        can reach the new inode, nobody needs to know it is open), if it is still open
        here; the file may be closed while the lock is on its way."""
        if ino not in self._iopen_owed:
            return
        self._iopen_owed.discard(ino)
        if self.opens.get(ino):
            await self._iopen_hold(ino)
            if not self.opens.get(ino):
                await self._iopen_release(ino)

    async def _iopen_release(self, ino: int) -> None:
        lock = self.iopen.pop(ino, None)
        if lock is not None:
            await self.glocks.locks.unlock(lock)

    async def _reap_if_unlinked(self, ino: int) -> None:
        """Free `ino` if it has no link left and no node has it open (cluster)."""
        if self.txn.withdrawn or self.opens.get(ino):
            return
        try:
            await self._free_if_unused_anywhere(ino)
        finally:
            self.unlinked.discard(ino)   # freed, or open elsewhere (its last close frees
                                         # it), or not ours to free any more

    async def _free_if_unused_anywhere(self, ino: int) -> str:
        """Free `ino` if it still has no name and no node has it open (iopen EX, tried;
        a one-node mount needs no lock): "freed"; "open" on another node (its last
        close frees it); or "gone" (it has a name, or another node freed it already,
        its block maybe reused)."""
        try:
            async with self._hold(pr=[ino], write=False):
                if self._inode(ino, kernel=False).d.nlink > 0:
                    return "gone"
        except FSError as exc:
            if exc.errno not in (errno.ENOENT, errno.ESTALE):
                raise
            return "gone"
        iopen = None
        if self.clustered:
            try:
                iopen = await self.glocks.locks.lock(("iopen", ino), Mode.EX, try_=True)
            except WouldBlock:
                return "open"
        try:
            return "freed" if await self._free_if_unlinked(ino) else "gone"
        except FSError as exc:
            if exc.errno not in (errno.ENOENT, errno.ESTALE):
                raise
            return "gone"
        finally:
            if iopen is not None:
                with trio.CancelScope(shield=True):
                    await self.glocks.locks.unlock(iopen)
