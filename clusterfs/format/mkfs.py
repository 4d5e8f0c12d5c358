"""The formatting logic, pure: plan a geometry, then list the blocks to write.

clusterfs.node.mkfs_cmd does the I/O; fsck and the tests reuse these functions.
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Iterator

from clusterfs.errors import FormatError
from clusterfs.format.block import BLOCK_SIZE, BlockType, new_block, seal
from clusterfs.format.inode import F_STUFFED, Inode, encode_inode
from clusterfs.format.journal import JF_CLEAN, JournalHeader, encode_jhead
from clusterfs.format.orphan import ORPHANS_PER_BLOCK, encode_orphans
from clusterfs.format.rgrp import (
    BITS_PER_BITMAP,
    RgrpHeader,
    bitmap_blocks_for,
    encode_bitmap,
    encode_rgrp,
    initial_bitmap,
    set_range,
    split_bitmap,
)
from clusterfs.format.superblock import (
    MAX_ORPHAN_BLOCKS,
    MIN_LOG_BLOCKS,
    SUPERBLOCK_BLKNO,
    SUPERBLOCK_OFFSET,
    Superblock,
    encode_superblock,
)

MIN_RGRP_BLOCKS = 64
DEFAULT_MAX_RGRP = BITS_PER_BITMAP     # 32512 blocks: one bitmap block per group
MIN_JOURNAL_BLOCKS = 128                # the default's range: 512 KiB ..
MAX_JOURNAL_BLOCKS = 8192              # .. 32 MiB
VALID_JOURNAL_BLOCKS = range(16, (1 << 30) // BLOCK_SIZE + 1)   # what may be asked for
# orphan blocks per slot by default: 8112 files a node holds unlinked while open (stress-
# ng's `open` stressor holds about 2300 per node; one block, 507, was the old format's)
DEFAULT_ORPHAN_BLOCKS = 16


def plan_geometry(device_bytes: int, journals: int = 1, journal_blocks: int | None = None,
                  rgrp_blocks: int | None = None, uuid: bytes | None = None,
                  now: int | None = None, orphans: int | None = None) -> Superblock:
    """Lay the filesystem out on a device of `device_bytes`; FormatError if it cannot.
    `orphans`: files a node may hold unlinked while open and still have them listed
    (rounded up to whole orphan blocks; default DEFAULT_ORPHAN_BLOCKS of them, at most
    an eighth of the journal)."""
    if not 1 <= journals <= 256:
        raise FormatError(f"journal count {journals} out of range 1..256")
    if journal_blocks is not None and journal_blocks not in VALID_JOURNAL_BLOCKS:
        low = VALID_JOURNAL_BLOCKS.start * BLOCK_SIZE >> 10
        high = (VALID_JOURNAL_BLOCKS.stop - 1) * BLOCK_SIZE >> 20
        raise FormatError(f"journal size {journal_blocks * BLOCK_SIZE >> 10} KiB out of range "
                          f"{low} KiB..{high} MiB")
    total = device_bytes // BLOCK_SIZE
    hb_start = SUPERBLOCK_BLKNO + 1
    jstart = hb_start + journals
    if journal_blocks is None:
        journal_blocks = max(MIN_JOURNAL_BLOCKS, min(MAX_JOURNAL_BLOCKS, total // (10 * journals)))
    orphan_blocks = _orphan_blocks(orphans, journal_blocks)
    rstart = jstart + journals * journal_blocks
    remaining = total - rstart
    if remaining < MIN_RGRP_BLOCKS:
        need = (rstart + MIN_RGRP_BLOCKS) * BLOCK_SIZE
        raise FormatError(f"device too small ({device_bytes} bytes; need at least {need})")
    if rgrp_blocks is None:
        rgrp_blocks = max(2048, min(DEFAULT_MAX_RGRP, remaining // 8))
    rgrp_blocks = min(rgrp_blocks, remaining)
    count, rest = divmod(remaining, rgrp_blocks)
    if rest >= MIN_RGRP_BLOCKS:
        count += 1
    else:
        total -= rest      # too small to be a group: leave it unused
    first_data = rstart + 1 + bitmap_blocks_for(rgrp_blocks)
    sb = Superblock(
        uuid=uuid or os.urandom(16), block_size=BLOCK_SIZE, total_blocks=total,
        journal_count=journals, journal_start=jstart, journal_blocks=journal_blocks,
        hb_start=hb_start, rgrp_start=rstart, rgrp_blocks=rgrp_blocks, rgrp_count=count,
        bitmap_blocks=bitmap_blocks_for(rgrp_blocks), root_ino=first_data,
        created=int(time.time()) if now is None else now,
    )
    sb.set_orphan_blocks(orphan_blocks)
    return sb


def _orphan_blocks(orphans: int | None, journal_blocks: int) -> int:
    """Orphan blocks per journal slot, taken from the end of each journal region."""
    if orphans is None:
        return max(1, min(DEFAULT_ORPHAN_BLOCKS, journal_blocks // 8,
                          journal_blocks - 1 - MIN_LOG_BLOCKS))
    blocks = -(-orphans // ORPHANS_PER_BLOCK)
    if not 1 <= blocks <= MAX_ORPHAN_BLOCKS:
        raise FormatError(f"orphans {orphans} out of range 1.."
                          f"{MAX_ORPHAN_BLOCKS * ORPHANS_PER_BLOCK}")
    if journal_blocks - 1 - blocks < MIN_LOG_BLOCKS:
        raise FormatError(f"orphans {orphans} ({blocks} blocks) leave the journal's log "
                          f"{journal_blocks - 1 - blocks} blocks, fewer than "
                          f"{MIN_LOG_BLOCKS}: a larger journal (-J) or fewer orphans")
    return blocks


def initial_journal_seq(sb: Superblock) -> int:
    """Where sequence numbers start: derived from the uuid, so a stale transaction
    left by an earlier format of the same device never looks current."""
    return (int.from_bytes(sb.uuid[:5], "little") << 8) | 1


def root_inode(sb: Superblock) -> Inode:
    t = sb.created
    return Inode(ino=sb.root_ino, mode=stat.S_IFDIR | 0o755, nlink=2, flags=F_STUFFED,
                 parent=sb.root_ino, atime=t, mtime=t, ctime=t, generation=1)


def rgrp_headers(sb: Superblock) -> Iterator[tuple[RgrpHeader, bytearray]]:
    """Each resource group's fresh header and bitmap (root inode allocated in group 0)."""
    for index in range(sb.rgrp_count):
        first, length = sb.rgrp_location(index)
        bm = bitmap_blocks_for(length)
        bits = initial_bitmap(length, bm)
        if index == 0:
            set_range(bits, sb.root_ino - first, 1)
        used = 1 + bm + (1 if index == 0 else 0)
        yield RgrpHeader(index, first, length, bm, length - used, int(index == 0)), bits


def initial_blocks(sb: Superblock) -> Iterator[tuple[int, bytes]]:
    """Every block mkfs writes, superblock last. Data blocks are not touched."""
    yield 0, bytes(SUPERBLOCK_OFFSET)     # blocks 0..15: wipe older signatures
    for slot in range(sb.journal_count):
        blk = sb.hb_start + slot
        yield blk, bytes(seal(new_block(BlockType.HEARTBEAT, blk), BlockType.HEARTBEAT, blk))
    seq = initial_journal_seq(sb)
    for slot in range(sb.journal_count):
        jblk = sb.journal_location(slot)
        yield jblk, bytes(encode_jhead(JournalHeader(slot, seq, 1, JF_CLEAN), jblk))
        yield jblk + 1, bytes(BLOCK_SIZE)   # the first log block: no stale transaction
        for oblk in sb.orphan_locations(slot):
            yield oblk, bytes(encode_orphans([], oblk))
    for header, bits in rgrp_headers(sb):
        yield header.first, bytes(encode_rgrp(header))
        for i, piece in enumerate(split_bitmap(bits, header.bitmap_blocks)):
            yield header.first + 1 + i, bytes(encode_bitmap(piece, header.first + 1 + i))
    yield sb.root_ino, bytes(encode_inode(root_inode(sb)))
    yield SUPERBLOCK_BLKNO, bytes(encode_superblock(sb))


def free_blocks(sb: Superblock) -> int:
    return sum(h.free for h, _ in rgrp_headers(sb))
