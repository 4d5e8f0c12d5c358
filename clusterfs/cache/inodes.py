"""InodeCache: every inode object this node keeps, each under its lock.

An entry lives only as long as what justifies it: this node holds the inode's
glock, or it created the inode under its parent's lock and that lock has not
gone since (no other node can know that inode; the fs drops it when the parent's
lock goes, docs/locking.md "Creates take no lock of their own"). So:

- a fresh grant of an inode's lock drops a clean entry: it was kept across a
  time without the lock, when another node may have changed the inode;
- a demote to nothing drops it once the flush is done (`drop_if_clean`, called
  by the fs between the flush and telling the kernel), since the next holder
  may change it; an entry still dirty then was created during the flush, under
  its parent's lock alone, and goes with the next flush;
- a demote to PR keeps it: a clean copy under a shared lock stays true.

The objects are the fs layer's (fs/inode.py: an inode with its map, directory
and xattrs); this layer only keeps them, keyed by inode number, and knows whether
the running transaction still has them dirty. Per-open state (open counts, the
kernel's references) lives apart, in the fs, and outlives an entry.
"""

from __future__ import annotations

from typing import Generic, TypeVar

from clusterfs.cache.glock import Glock, GlockManager
from clusterfs.cache.transaction import TransactionManager

T = TypeVar("T")


class InodeCache(Generic[T]):
    def __init__(self, txn: TransactionManager) -> None:
        self._txn = txn
        self._by_ino: dict[int, T] = {}

    def attach(self, glocks: GlockManager, kind: str = "inode") -> None:
        """Drop clean entries when their lock is granted afresh."""
        glocks.on_grant(kind, self._granted)

    def _granted(self, glock: Glock) -> None:
        self.drop_if_clean(glock.name[1])

    def get(self, ino: int) -> T | None:
        return self._by_ino.get(ino)

    def __getitem__(self, ino: int) -> T:
        return self._by_ino[ino]

    def __contains__(self, ino: int) -> bool:
        return ino in self._by_ino

    def put(self, ino: int, obj: T) -> None:
        """Keep `obj` for `ino`: read under the inode's lock, or just created."""
        self._by_ino[ino] = obj

    def discard(self, ino: int) -> None:
        """The inode is gone (freed here): nothing to keep."""
        self._by_ino.pop(ino, None)

    def drop_if_clean(self, ino: int) -> None:
        """Forget `ino` unless the running transaction still has it dirty."""
        obj = self._by_ino.get(ino)
        if obj is not None and not self._txn.is_dirty(obj):
            del self._by_ino[ino]
