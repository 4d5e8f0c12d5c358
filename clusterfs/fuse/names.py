"""KernelNames: the names this mount handed to the kernel, so a demote can take them back.

In a cluster the kernel caches no names for long (entry timeout 0: every path walk asks
again), but it keeps the dentries themselves, and a directory's dentry is unique: when
another node moves a directory, the old dentry here still stands for it. The next lookup
that finds the directory at its new place must move that alias (d_splice_alias), which
needs the rename lock and the old parent's lock by trylock; inside a rename, or while
another request holds the old parent, that fails and the application sees ESTALE.

So when a directory's lock goes to another node (which may change its names), every name
this mount handed out in it is invalidated. `invalidate_entry` waits for the directory's
inode lock, which a pending lookup there holds while it waits for the very glock being
demoted: the demote therefore only queues the names, and one worker thread invalidates
them once the kernel lets it (docs/locking.md, "kernel caches").

That leaves a window (the worker may not have run yet, or may wait behind a pending
lookup), so a lookup that finds a directory somewhere other than where this mount last
showed it also takes the old name back itself, waiting a moment for it (`moved_from`):
if the very request holds the old parent's lock (a rename there), the wait ends, the
kernel gets its ESTALE and retries the lookup, and by then the old name is gone.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)

# names remembered per directory before the oldest are let go: a directory listed with
# readdirplus hands out every name in it, and forgetting a name only costs a later ESTALE
# chance, never correctness of data
NAMES_PER_DIR_MAX = 4096


class KernelNames:
    def __init__(self, invalidate_entry: Callable[[int, bytes], None]) -> None:
        self._invalidate_entry = invalidate_entry
        self._names: dict[int, dict[bytes, None]] = {}    # directory -> names (ordered)
        self._dir_at: dict[int, tuple[int, bytes]] = {}   # directory -> where shown last
        self._dir_by_place: dict[tuple[int, bytes], int] = {}   # and back
        self._queue: queue.SimpleQueue[tuple[int, list[bytes]] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._work, name="clusterfs-names",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=5)
            self._thread = None

    def remember(self, parent: int, name: bytes, directory: int | None = None) -> None:
        """The kernel now has a dentry `name` in `parent` (FUSE inode numbers); for a
        directory, its number (a directory has one dentry: see moved_from)."""
        if directory is not None:
            self._place(directory, (parent, name))
            if len(self._dir_at) > NAMES_PER_DIR_MAX * 16:
                self._unplace(next(iter(self._dir_at)))
        names = self._names.setdefault(parent, {})
        names[name] = None
        if len(names) > NAMES_PER_DIR_MAX:
            del names[next(iter(names))]

    def renamed(self, old: tuple[int, bytes], new: tuple[int, bytes], exchange: bool) -> None:
        """A rename here succeeded: the kernel moved its dentry at `old` (parent, name)
        to `new`, or swapped the two. A directory recorded at either place is now at
        the other (else moved_from would later name the place another directory has
        taken, and invalidate that one instead of the stale alias); one replaced at
        `new` is gone."""
        at_old = self._dir_by_place.get(old)
        at_new = self._dir_by_place.get(new)
        for directory in (at_old, at_new):
            if directory is not None:
                self._unplace(directory)
        if at_old is not None:
            self._place(at_old, new)
        if exchange and at_new is not None:
            self._place(at_new, old)

    def _place(self, directory: int, at: tuple[int, bytes]) -> None:
        self._unplace(directory)
        other = self._dir_by_place.pop(at, None)
        if other is not None:
            self._dir_at.pop(other, None)    # that name now shows this directory
        self._dir_at[directory] = at
        self._dir_by_place[at] = directory

    def _unplace(self, directory: int) -> None:
        at = self._dir_at.pop(directory, None)
        if at is not None and self._dir_by_place.get(at) == directory:
            del self._dir_by_place[at]

    def moved_from(self, directory: int, parent: int, name: bytes) -> tuple[int, bytes] | None:
        """Where the kernel may still have `directory`'s dentry, if not at (parent, name)."""
        at = self._dir_at.get(directory)
        return at if at is not None and at != (parent, name) else None

    def take_back(self, parent: int) -> None:
        """Queue every name handed out in `parent` for invalidation (never blocks)."""
        names = self._names.pop(parent, None)
        if names and self._thread is not None:
            self._queue.put((parent, list(names)))

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            parent, names = item
            for name in names:
                try:
                    self._invalidate_entry(parent, name)
                except OSError:
                    pass                 # the kernel no longer has it: nothing to do
                except Exception as exc:   # never let the worker die: log and go on
                    log.debug("invalidate_entry %d/%r: %s", parent, name, exc)
