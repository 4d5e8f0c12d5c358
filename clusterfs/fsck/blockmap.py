"""Who owns each block: filesystem metadata, an inode, or nobody (yet).

One byte per block (a 1 GiB device is 262 144 bytes), so claiming an extent
is a slice test, not a loop. The owners of claimed runs are kept in a list and
only searched when two claims collide, which is the rare, reported case.
"""

from __future__ import annotations

from dataclasses import dataclass

UNCLAIMED = 0
METADATA = 1      # superblock, heartbeat slots, journals, rgrp headers and bitmaps
OWNED = 2         # reached by the walk: an inode or a block an inode owns

NONZERO = bytes([0] + [1] * 255)    # translate table: any claim -> 1


@dataclass
class Claim:
    start: int
    count: int
    owner: int          # inode number, or 0 for filesystem metadata
    what: str           # "superblock", "rgrp 2 bitmap", "data", "extent block", ...


class BlockMap:
    def __init__(self, total_blocks: int) -> None:
        self.state = bytearray(total_blocks)
        self.claims: list[Claim] = []

    def mark_metadata(self, start: int, count: int, what: str) -> None:
        self.state[start : start + count] = bytes([METADATA]) * count
        self.claims.append(Claim(start, count, 0, what))

    def claim(self, start: int, count: int, owner: int, what: str) -> Claim | None:
        """Claim a run for inode `owner`; on a collision return the earlier claim
        it collides with."""
        seg = self.state[start : start + count]
        if seg.count(UNCLAIMED) == count:
            self.state[start : start + count] = bytes([OWNED]) * count
            self.claims.append(Claim(start, count, owner, what))
            return None
        other = self.who_owns(start, count)
        # still claim the free part: it is reachable and must not look leaked
        for i, v in enumerate(seg):
            if v == UNCLAIMED:
                self.state[start + i] = OWNED
        self.claims.append(Claim(start, count, owner, what))
        return other

    def who_owns(self, start: int, count: int) -> Claim:
        end = start + count
        for c in self.claims:
            if c.start < end and start < c.start + c.count:
                return c
        return Claim(start, count, 0, "unknown")

    def owner_at(self, blkno: int) -> Claim | None:
        if not self.state[blkno]:
            return None
        return self.who_owns(blkno, 1)

    def used_bytes(self, start: int, count: int) -> bytes:
        """One byte per block of the run: 1 if claimed by anyone, else 0."""
        return bytes(self.state[start : start + count]).translate(NONZERO)

    def used_count(self) -> int:
        return len(self.state) - self.state.count(UNCLAIMED)


def describe(c: Claim) -> str:
    return c.what if c.owner == 0 else f"inode {c.owner} ({c.what})"
