"""Block reads for fsck, seen through the journal.

When a journal holds committed transactions nobody replayed yet, the blocks
at home are stale: the filesystem a mount would see is home + those copies.
A check without --repair must not write, so it reads through an overlay of
the committed copies instead (later transactions win) and judges that.
"""

from __future__ import annotations

from clusterfs.storage.device import BlockDevice


class Reader:
    def __init__(self, dev: BlockDevice, total_blocks: int) -> None:
        self.dev = dev
        self.total_blocks = total_blocks
        self.overlay: dict[int, bytes] = {}

    def add_overlay(self, blocks: dict[int, bytes]) -> None:
        self.overlay.update(blocks)

    def read(self, blkno: int) -> bytes:
        copy = self.overlay.get(blkno)
        if copy is not None:
            return copy
        return self.dev.read(blkno)

    def in_device(self, blkno: int, count: int = 1) -> bool:
        return blkno >= 0 and blkno + count <= self.total_blocks
