"""OrphanList: this node's orphan block in memory (format/orphan.py).

An inode whose last name goes while it may still be open (here or on another node)
is listed in the orphan block of the slot of the node that removed the name, in the
same transaction as its link count; freeing it takes it off. What is left listed
when a node dies is freed by the survivors after they replay its journal; what is
left after a crash of the whole cluster, by the node that mounts the slot next (it
adopts every slot the first-mounter rule replays). An entry whose inode another
node freed meanwhile (the last closer) is simply dropped at the next sweep.

Only its own node writes a slot's orphan block while that node lives, so it needs
no lock of its own: the journal slot's lock covers it.
"""

from __future__ import annotations

import logging

from clusterfs.format.orphan import ORPHANS_MAX, decode_orphans, encode_orphans

log = logging.getLogger(__name__)


class OrphanList:
    def __init__(self, blkno: int, inodes: list[int]) -> None:
        self.blkno = blkno
        self.inodes: set[int] = set(inodes)
        self._full_said = False

    @classmethod
    def decode(cls, raw: bytes, blkno: int) -> OrphanList:
        return cls(blkno, decode_orphans(raw, blkno))

    def __len__(self) -> int:
        return len(self.inodes)

    def add(self, ino: int) -> bool:
        """List `ino`; False if the block is full (the inode is then left to fsck if
        this node dies before it is freed; said once)."""
        if ino in self.inodes:
            return False
        if len(self.inodes) >= ORPHANS_MAX:
            if not self._full_said:
                log.warning("orphan list full (%d inodes unlinked while open): inode %d "
                            "is not listed; if this node dies before it is closed, "
                            "fsck --repair frees it", ORPHANS_MAX, ino)
                self._full_said = True
            return False
        self.inodes.add(ino)
        return True

    def update(self, inodes: list[int]) -> list[int]:
        """List several (adopted from a departed slot) while there is room; those that
        did not fit, which the caller leaves listed where they were."""
        new = [ino for ino in inodes if ino not in self.inodes]
        room = max(ORPHANS_MAX - len(self.inodes), 0)
        self.inodes.update(new[:room])
        return new[room:]

    def discard(self, ino: int) -> bool:
        if ino not in self.inodes:
            return False
        self.inodes.discard(ino)
        self._full_said = False
        return True

    # -- Dirtyable (cache.transaction) ------------------------------------------------
    def block_estimate(self) -> int:
        return 1

    def to_blocks(self) -> dict[int, bytes]:
        return {self.blkno: bytes(encode_orphans(self.inodes, self.blkno))}
