"""Resource groups: a header block, bitmap blocks, then data blocks.

One bit per block of the group (bit i of the group's bitmap covers block first+i,
least significant bit first). The header and bitmap blocks themselves are marked
used. The header carries the free count (in a cluster it also travels in the
("rgrp", n) lock value block).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from clusterfs.errors import FormatError
from clusterfs.format.block import BLOCK_SIZE, HEADER_SIZE, BlockType, check, new_block, seal

_FIELDS = struct.Struct("<IQIIIIQ")
BITMAP_BYTES = BLOCK_SIZE - HEADER_SIZE     # 4064 bytes of bits per bitmap block
BITS_PER_BITMAP = BITMAP_BYTES * 8           # 32512 blocks


@dataclass
class RgrpHeader:
    index: int
    first: int          # absolute block number of this header
    length: int         # blocks in the group, header and bitmaps included
    bitmap_blocks: int
    free: int
    inodes: int = 0     # inode blocks allocated in the group (statistics)
    flags: int = 0
    seq: int = 0


def bitmap_blocks_for(length: int) -> int:
    return -(-length // BITS_PER_BITMAP)


def encode_rgrp(h: RgrpHeader) -> bytearray:
    buf = new_block(BlockType.RGRP, h.first, h.seq)
    _FIELDS.pack_into(buf, HEADER_SIZE, h.index, h.first, h.length, h.bitmap_blocks, h.free,
                      h.flags, h.inodes)
    return seal(buf, BlockType.RGRP, h.first, h.seq)


def decode_rgrp(buf: bytes | bytearray | memoryview, blkno: int) -> RgrpHeader:
    seq = check(buf, blkno, BlockType.RGRP)
    index, first, length, bm, free, flags, inodes = _FIELDS.unpack_from(buf, HEADER_SIZE)
    if first != blkno or free > length or bm != bitmap_blocks_for(length):
        raise FormatError(f"resource group header {blkno}: inconsistent fields")
    return RgrpHeader(index, first, length, bm, free, inodes, flags, seq)


def encode_bitmap(bits: bytes | bytearray | memoryview, blkno: int, seq: int = 0) -> bytearray:
    """One bitmap block holding BITMAP_BYTES of bits (shorter input is zero padded)."""
    buf = new_block(BlockType.BITMAP, blkno, seq)
    buf[HEADER_SIZE : HEADER_SIZE + len(bits)] = bits
    return seal(buf, BlockType.BITMAP, blkno, seq)


def decode_bitmap(buf: bytes | bytearray | memoryview, blkno: int) -> bytes:
    check(buf, blkno, BlockType.BITMAP)
    return bytes(buf[HEADER_SIZE:BLOCK_SIZE])


def split_bitmap(bits: bytes | bytearray, nblocks: int) -> list[bytes]:
    """Cut a group's whole bitmap into per-block pieces."""
    return [bytes(bits[i * BITMAP_BYTES : (i + 1) * BITMAP_BYTES]) for i in range(nblocks)]


def count_used(bits: bytes | bytearray, length: int) -> int:
    """Set bits among the first `length`."""
    full, rem = divmod(length, 8)
    used = int.from_bytes(bits[:full], "little").bit_count()
    if rem:
        used += (bits[full] & ((1 << rem) - 1)).bit_count()
    return used


def initial_bitmap(length: int, bitmap_blocks: int) -> bytearray:
    """A fresh group's bitmap: header + bitmap blocks used, past-the-end bits set."""
    bits = bytearray(bitmap_blocks * BITMAP_BYTES)
    set_range(bits, 0, 1 + bitmap_blocks)
    set_range(bits, length, bitmap_blocks * BITS_PER_BITMAP - length)
    return bits


def set_range(bits: bytearray, start: int, count: int, value: bool = True) -> None:
    """Set (or clear) `count` bits from bit `start`, whole bytes at a time where possible."""
    end = start + count
    while start < end and start % 8:
        _set_bit(bits, start, value)
        start += 1
    whole = (end - start) // 8
    if whole > 0:
        bits[start // 8 : start // 8 + whole] = (b"\xff" if value else b"\0") * whole
        start += whole * 8
    while start < end:
        _set_bit(bits, start, value)
        start += 1


def _set_bit(bits: bytearray, i: int, value: bool) -> None:
    if value:
        bits[i >> 3] |= 1 << (i & 7)
    else:
        bits[i >> 3] &= ~(1 << (i & 7)) & 0xFF


def test_bit(bits: bytes | bytearray, i: int) -> bool:
    return bool(bits[i >> 3] & (1 << (i & 7)))
