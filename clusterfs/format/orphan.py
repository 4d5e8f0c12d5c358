"""Orphan blocks: `sb.orphan_blocks` per journal slot, the last blocks of its journal
region (`sb.orphan_locations(slot)`), listing the inodes that slot's node unlinked while
they were still open (OCFS2 keeps an orphan directory per slot for the same reason).
An inode is listed in one of its slot's blocks, any one (fs/orphans.py chooses).

Such an inode has no name left but must live until its last opener in the cluster
closes it. If the node that unlinked it dies (or the whole cluster does), nobody
would ever free it: the survivors that replay the dead node's journal, or the node
that mounts the slot next, read its orphan block and free what no node holds open.
The block changes in the same journaled transaction as the link count, so after a
replay it agrees with the inodes.

Layout (little-endian), after the 32-byte block header (type ORPHAN, its own address,
seq 0, crc32c over the whole block):

    32  u32 count
    36  u32 reserved   zero
    40  count u64 inode numbers, ascending (at most ORPHANS_PER_BLOCK)

mkfs writes every slot's blocks empty. Pure: no I/O.
"""

from __future__ import annotations

import struct

from clusterfs.errors import FormatError
from clusterfs.format.block import BLOCK_SIZE, HEADER_SIZE, BlockType, check, new_block, seal

_COUNT = struct.Struct("<II")
ORPHANS_PER_BLOCK = (BLOCK_SIZE - HEADER_SIZE - _COUNT.size) // 8     # 507


def encode_orphans(inodes: list[int] | set[int], blkno: int) -> bytearray:
    listed = sorted(inodes)
    if len(listed) > ORPHANS_PER_BLOCK:
        raise FormatError(f"orphan block {blkno}: {len(listed)} inodes > {ORPHANS_PER_BLOCK}")
    buf = new_block(BlockType.ORPHAN, blkno)
    _COUNT.pack_into(buf, HEADER_SIZE, len(listed), 0)
    struct.pack_into(f"<{len(listed)}Q", buf, HEADER_SIZE + _COUNT.size, *listed)
    return seal(buf, BlockType.ORPHAN, blkno)


def decode_orphans(buf: bytes | bytearray | memoryview, blkno: int) -> list[int]:
    check(buf, blkno, BlockType.ORPHAN)
    count, _ = _COUNT.unpack_from(buf, HEADER_SIZE)
    if count > ORPHANS_PER_BLOCK:
        raise FormatError(f"orphan block {blkno}: count {count} > {ORPHANS_PER_BLOCK}")
    return list(struct.unpack_from(f"<{count}Q", buf, HEADER_SIZE + _COUNT.size))
