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
- a demote to PR keeps it: a clean copy under a shared lock stays true;
- the one exception: an inode made here under its directory's lock, whose first
  lock of its own is taken while that directory lock is still held EX
  (`keep_at_first_grant`): no other node could reach it meanwhile, so its copy,
  and any change a local operation makes to it under the new lock, stays.

The objects are the fs layer's (fs/inode.py: an inode with its map, directory
and xattrs); this layer only keeps them, keyed by inode number, and knows whether
the running transaction still has them dirty. Per-open state (open counts, the
kernel's references) lives apart, in the fs, and outlives an entry.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Generic, TypeVar

from clusterfs.cache.glock import Glock, GlockManager
from clusterfs.cache.transaction import TransactionManager

T = TypeVar("T")


class InodeCache(Generic[T]):
    def __init__(self, txn: TransactionManager) -> None:
        self._txn = txn
        self._by_ino: dict[int, T] = {}
        self._keep_next: set[int] = set()     # inodes whose next fresh grant keeps them

    def attach(self, glocks: GlockManager, kind: str = "inode") -> None:
        """Drop clean entries when their lock is granted afresh."""
        glocks.on_grant(kind, self._granted)

    def _granted(self, glock: Glock) -> None:
        ino = glock.name[1]
        if ino in self._keep_next:
            self._keep_next.discard(ino)      # (only the first: see keep_at_first_grant)
            return
        self.drop_if_clean(ino)

    def keep_at_first_grant(self, inos: Iterable[int]) -> None:
        """The next fresh grant of each of these inodes' locks keeps its entry (until
        `end_keep`). For inodes made here whose directory's EX lock is still held while
        their own locks are taken: their copies are the newest anywhere. Dropping one
        at the grant and putting it back after all the locks were taken lost any change
        made under its new lock in between: the one kept is the one changed."""
        self._keep_next.update(inos)

    def end_keep(self, inos: Iterable[int]) -> None:
        """Grants from now on drop as usual (the directory's lock is going down)."""
        self._keep_next.difference_update(inos)

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
