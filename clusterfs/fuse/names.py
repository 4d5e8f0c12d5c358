"""KernelNames: the names and directory node ids this mount handed to the kernel.

In a cluster the kernel caches names only while their directory's lock stays here (a
LOOKUP's answer, on kernels with FUSE_NOTIFY_INC_EPOCH: fuse/epoch.py; else none: every
path walk asks again), but it keeps the dentries themselves, and a directory inode has
exactly one dentry. When another node moves a directory, the dentry here still stands for it at the
old place. A lookup that finds the directory at its new place under the same node id
makes the kernel move that dentry (fs/dcache.c: d_splice_alias -> __d_unalias), which
needs the rename mutex and the old parent's lock, by trylock. Inside a cross-directory
rename (do_renameat2 holds the rename mutex itself while it looks its last components up),
or while another request holds the old parent, that fails: ESTALE. The rename retries
once (retry_estale, LOOKUP_REVAL) and fails the same way if the old dentry is still
there, and nothing can take a dentry away that an open directory or a working directory
holds (invalidation only unhashes it; it stays the inode's alias).

So a directory is shown under a node id of its own per place, in effect: its node id is
its inode number plus an id generation in the high bits (`node_id`). A lookup that finds
a directory where the kernel may hold it under its current id elsewhere hands it out
under a new generation (`directory_id`): to the kernel that is another inode, with no
alias to move, and the old one stays valid at its old place for whoever holds it (the
requests on either id reach the same directory). Cases where the old id can be kept:
the kernel's dentry of it is at this very place (or in the same parent: a move there
takes no lock); or the kernel holds no lookup of it (then it has no inode, no alias).
So only a directory another node moved while this kernel held it changes node id, and it
goes back to its inode number once the kernel has forgotten every older id. Its st_ino
stays the inode number throughout (fuse/attrino.py sets the attributes' inode number
apart from the node id). What it costs: the kernel's own loop checks on rename walk
dentries, which no longer see an old alias: ours do not depend on them
(FileSystem._ancestors checks the disk, under the rename lock).

To know which ids the kernel may hold, every entry for a directory counts one lookup
per node id (`remember`), and FORGET takes them back (`forgotten`). A directory's block
reused by a new inode (another generation on disk) retires its ids: the new directory
takes over id generation 0, with its count (the kernel marks the old inode with that id
bad itself, seeing the new generation), and requests on its other ids are ESTALE
(`is_stale`), as they would be on a reused inode number.

The names themselves: when a directory's lock goes to another node (which may change its
names), every name this mount handed out in it is invalidated (`take_back`), so unused
dentries go and the kernel forgets their ids. `invalidate_entry` waits for the
directory's inode lock, which a pending lookup there holds while it waits for the very
glock being demoted: the demote therefore only queues the names, and one worker thread
invalidates them once the kernel lets it (docs/locking.md, "Kernel caches"). A directory
given a new id has its old dentry queued the same way (nothing waits for it).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)

# names remembered per directory before the oldest are let go: a directory listed with
# readdirplus hands out every name in it, and a name not taken back stays in the kernel
# only until a lookup there finds it changed (entry timeout 0)
NAMES_PER_DIR_MAX = 4096

# A node id is an inode number (a block address) with an id generation above it. Bits
# 48-62: below 2**63, so that nothing that reads a node id as signed (st_ino was the
# node id before fuse/attrino.py, and is where pyfuse3's layout is unknown) sees it
# negative; blocks below 2**48 (1 EiB of 4 KiB blocks).
GEN_SHIFT = 48
INO_MASK = (1 << GEN_SHIFT) - 1
GENERATIONS = 1 << 15

Place = tuple[int, bytes]                # (parent node id, name): a dentry in the kernel


def node_id(ino: int, gen: int) -> int:
    return ino | gen << GEN_SHIFT


def ino_of(nid: int) -> int:
    return nid & INO_MASK


class _Directory:
    """One directory's ids in the kernel."""
    __slots__ = ("gen", "generation", "held", "inherited")

    def __init__(self, generation: int) -> None:
        self.generation = generation     # the inode's generation on disk they are for
        self.gen = 0                     # the id generation lookups hand out now
        self.held: dict[int, int] = {}   # node id -> lookups the kernel holds
        # the inode number's lookups are still only a deleted directory's (which the
        # kernel marks bad once it sees the number with this generation): free to use
        self.inherited = False


class KernelNames:
    def __init__(self, invalidate_entry: Callable[[int, bytes], None],
                 generations: bool = True) -> None:
        self._invalidate_entry = invalidate_entry
        # False where inode numbers need the high bits (a device of 2**48 blocks or
        # more): every directory keeps its inode number, and the ESTALE stays possible
        self._generations = generations
        self._names: dict[int, dict[bytes, None]] = {}    # parent id -> names (ordered)
        self._dir_at: dict[int, Place] = {}               # directory id -> its dentry
        self._dir_by_place: dict[Place, int] = {}         # and back
        self._dirs: dict[int, _Directory] = {}            # inode -> its ids
        # inode -> the ids the kernel holds (replaced whole: worker threads read it)
        self._ids: dict[int, tuple[int, ...]] = {}
        self._stale: dict[int, int] = {}   # id of a directory since deleted -> lookups
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

    # -- node ids ------------------------------------------------------------------
    def directory_id(self, ino: int, generation: int, at: Place) -> int:
        """The node id to show directory `ino` (of this generation on disk) under at
        `at`: one the kernel can take without moving a dentry from elsewhere. Counted
        only once the entry is in a reply (remember)."""
        d = self._directory(ino, generation)
        shown = self._dir_by_place.get(at)
        if shown is not None and shown in d.held:
            return shown                 # the kernel's dentry here has this id
        current = node_id(ino, d.gen)
        place = self._dir_at.get(current)
        if current not in d.held or d.inherited or \
                (place is not None and place[0] == at[0]):
            return current               # no inode, so no alias; or a lock-free move
        self._queue_invalidate(place)    # the old dentry: let it go when it can
        return self._new_id(ino, d)

    def file_id(self, ino: int) -> int:
        """The node id of a non-directory (its inode number: hard links are fine, the
        kernel allows those several dentries). Its block may have held a directory:
        that one's ids are retired."""
        if ino in self._dirs:
            self._retire(ino)
        return ino

    def is_stale(self, nid: int) -> bool:
        """A node id of a directory since deleted (its block holds a new inode)."""
        return nid in self._stale

    def ids(self, ino: int) -> tuple[int, ...]:
        """The node ids the kernel may know `ino` by (empty: only its inode number).
        Safe from any thread."""
        return self._ids.get(ino, ())

    def _directory(self, ino: int, generation: int) -> _Directory:
        d = self._dirs.get(ino)
        if d is not None and d.generation == generation:
            return d
        gen0 = self._retire(ino) if d is not None else 0
        d = self._dirs[ino] = _Directory(generation)
        if gen0:                         # the kernel may still hold the dead one's
            d.held[ino] = gen0           # inode under it: its FORGETs will come
            d.inherited = True
            self._ids[ino] = (ino,)
        return d

    def _retire(self, ino: int) -> int:
        """The directory at `ino` was deleted: its ids other than the inode number are
        stale; returns the lookups the kernel holds under the inode number."""
        d = self._dirs.pop(ino)
        self._ids.pop(ino, None)
        for nid, count in d.held.items():
            self._unplace(nid)
            if nid != ino:
                self._stale[nid] = count
        return d.held.get(ino, 0)

    def _new_id(self, ino: int, d: _Directory) -> int:
        if not self._generations:
            return node_id(ino, d.gen)
        for step in range(1, GENERATIONS):
            gen = (d.gen + step) % GENERATIONS
            nid = node_id(ino, gen)
            if nid not in d.held and nid not in self._stale:
                d.gen = gen
                return nid
        return node_id(ino, d.gen)       # 32 767 ids held at once: cannot happen

    # -- what the kernel got and gave back -------------------------------------------
    def remember(self, parent: int, name: bytes, directory: int | None = None) -> None:
        """The kernel now has a dentry `name` in `parent` (node ids); for a directory,
        its node id (from directory_id), counted as one more lookup the kernel holds."""
        if directory is not None:
            d = self._dirs.get(ino_of(directory))
            if d is not None:
                self._hold(d, directory)
                self._place(directory, (parent, name))
        names = self._names.setdefault(parent, {})
        names[name] = None
        if len(names) > NAMES_PER_DIR_MAX:
            del names[next(iter(names))]

    def _hold(self, d: _Directory, nid: int) -> None:
        if nid == ino_of(nid):
            d.inherited = False          # the count is this directory's too now
        if nid not in d.held:
            self._ids[ino_of(nid)] = (*d.held, nid)
        d.held[nid] = d.held.get(nid, 0) + 1

    def forgotten(self, nid: int, count: int) -> None:
        """The kernel's FORGET: it let go of `count` lookups of `nid`."""
        if nid in self._stale:
            left = self._stale.pop(nid) - count
            if left > 0:
                self._stale[nid] = left
            return
        ino = ino_of(nid)
        d = self._dirs.get(ino)
        if d is None or nid not in d.held:
            return
        left = d.held.pop(nid) - count
        if left > 0:
            d.held[nid] = left
            return
        self._unplace(nid)               # no inode with this id: no dentry either
        self._names.pop(nid, None)
        if d.held:
            self._ids[ino] = tuple(d.held)
        else:                            # nothing held: the inode number again next
            del self._dirs[ino]
            self._ids.pop(ino, None)

    def renamed(self, old: Place, new: Place, exchange: bool) -> None:
        """A rename here succeeded: the kernel moved its dentry at `old` (parent, name)
        to `new`, or swapped the two. A directory recorded at either place is now at
        the other (else directory_id would take the dentry for one at the old place);
        one replaced at `new` is gone."""
        at_old = self._dir_by_place.get(old)
        at_new = self._dir_by_place.get(new)
        for directory in (at_old, at_new):
            if directory is not None:
                self._unplace(directory)
        if at_old is not None:
            self._place(at_old, new)
        if exchange and at_new is not None:
            self._place(at_new, old)

    def _place(self, directory: int, at: Place) -> None:
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

    # -- taking names back -------------------------------------------------------------
    def take_back(self, parent: int) -> None:
        """Queue every name handed out in `parent` (a node id) for invalidation (never
        blocks)."""
        names = self._names.pop(parent, None)
        if names and self._thread is not None:
            self._queue.put((parent, list(names)))

    def _queue_invalidate(self, at: Place | None) -> None:
        if at is not None and self._thread is not None:
            self._queue.put((at[0], [at[1]]))

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
