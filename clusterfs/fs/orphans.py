"""OrphanList: a slot's orphan blocks in memory (format/orphan.py).

An inode whose last name goes while it may still be open (here or on another node)
is listed in an orphan block of the slot of the node that removed the name, in the
same transaction as its link count; freeing it takes it off. What is left listed
when a node dies is freed by the survivors after they replay its journal; what is
left after a crash of the whole cluster, by the node that mounts the slot next (it
adopts every slot the first-mounter rule replays). An entry whose inode another
node freed meanwhile (the last closer) is simply dropped at the next sweep.

Only its own node writes a slot's orphan blocks while that node lives, so it needs
no lock of its own: the journal slot's lock covers it.
"""

from __future__ import annotations

import logging

from clusterfs.format.orphan import ORPHANS_PER_BLOCK, decode_orphans, encode_orphans

log = logging.getLogger(__name__)


class OrphanList:
    """A slot's orphan blocks (`blknos`) in memory: which inodes are listed, and in
    which block each is. A change rewrites only the blocks it touched (an unlink of an
    open file logs one orphan block, not all of them)."""

    def __init__(self, blknos: list[int], listed: list[list[int]]) -> None:
        self.blknos = blknos
        self.inodes: set[int] = set()
        self._where: dict[int, int] = {}         # inode -> index of its block
        self._count = [0] * len(blknos)
        self._changed: set[int] = set()          # blocks to write at the next commit
        for index, inodes in enumerate(listed):
            for ino in inodes:
                if ino not in self._where:
                    self._place(ino, index)
        self._changed.clear()
        self._full_said = False

    @classmethod
    def decode(cls, raws: list[bytes], blknos: list[int]) -> OrphanList:
        return cls(blknos, [decode_orphans(raw, b) for raw, b in zip(raws, blknos,
                                                                      strict=True)])

    @classmethod
    def rewritten(cls, blknos: list[int], inodes: list[int]) -> OrphanList:
        """A list of `inodes` whose every block is written at the next commit (what a
        departed slot keeps after an adoption)."""
        out = cls(blknos, [[] for _ in blknos])
        out.update(inodes)
        out._changed = set(range(len(blknos)))
        return out

    @property
    def capacity(self) -> int:
        return ORPHANS_PER_BLOCK * len(self.blknos)

    def __len__(self) -> int:
        return len(self.inodes)

    def add(self, ino: int) -> bool:
        """List `ino`; False if every block is full (the inode is then left to fsck if
        this node dies before it is freed; said once)."""
        if ino in self.inodes:
            return False
        index = self._room_for(ino)
        if index is None:
            if not self._full_said:
                log.warning("orphan list full (%d inodes unlinked while open): inode %d "
                            "is not listed; if this node dies before it is closed, "
                            "fsck --repair frees it (mkfs --orphans sets the room)",
                            self.capacity, ino)
                self._full_said = True
            return False
        self._place(ino, index)
        return True

    def update(self, inodes: list[int]) -> list[int]:
        """List several (adopted from a departed slot) while there is room; those that
        did not fit, which the caller leaves listed where they were (and says so: no
        "list full" warning here, nothing is left unlisted)."""
        left_out: list[int] = []
        for ino in inodes:
            if ino in self.inodes:
                continue
            index = self._room_for(ino)
            if index is None:
                left_out.append(ino)
            else:
                self._place(ino, index)
        return left_out

    def discard(self, ino: int) -> bool:
        index = self._where.pop(ino, None)
        if index is None:
            return False
        self.inodes.discard(ino)
        self._count[index] -= 1
        self._changed.add(index)
        self._full_said = False
        return True

    def _room_for(self, ino: int) -> int | None:
        """The block to list `ino` in: the one its number hashes to (the lists stay
        even), else the first with room; None when all are full."""
        home = ino % len(self.blknos)
        if self._count[home] < ORPHANS_PER_BLOCK:
            return home
        return next((i for i, n in enumerate(self._count) if n < ORPHANS_PER_BLOCK), None)

    def _place(self, ino: int, index: int) -> None:
        self.inodes.add(ino)
        self._where[ino] = index
        self._count[index] += 1
        self._changed.add(index)

    # -- Dirtyable (cache.transaction) ------------------------------------------------
    def block_estimate(self) -> int:
        return max(1, len(self._changed))

    def to_blocks(self) -> dict[int, bytes]:
        """The blocks changed since the last commit took them (called once per commit)."""
        lists: dict[int, list[int]] = {i: [] for i in self._changed}
        for ino, index in self._where.items():
            if index in lists:
                lists[index].append(ino)
        self._changed = set()
        return {self.blknos[i]: bytes(encode_orphans(inodes, self.blknos[i]))
                for i, inodes in lists.items()}
