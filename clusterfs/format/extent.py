"""Extents: runs of contiguous blocks of a file.

An extent record is 24 bytes: u64 logical block, u64 physical block, u32 count,
u32 flags (0). Records are sorted by logical block and never overlap; a logical
block no record covers is a hole and reads as zeros.

Up to INLINE_EXTENTS records live in the inode payload (flag EXTENTS). More go
to extent blocks (flag EXTBLOCKS: the payload lists the blocks' addresses); each
extent block holds u32 count, u32 pad, then up to EXTENTS_PER_BLOCK records.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from clusterfs.errors import FormatError
from clusterfs.format.block import BLOCK_SIZE, HEADER_SIZE, BlockType, check, new_block, seal
from clusterfs.format.inode import PAYLOAD_MAX

RECORD = struct.Struct("<QQII")
INLINE_EXTENTS = PAYLOAD_MAX // RECORD.size                      # 122
EXTENTS_PER_BLOCK = (BLOCK_SIZE - HEADER_SIZE - 8) // RECORD.size  # 169
MAX_EXTENT_BLOCKS = PAYLOAD_MAX // 8                              # 366


class Extent(NamedTuple):
    lblk: int
    pblk: int
    count: int

    @property
    def lend(self) -> int:
        return self.lblk + self.count


def encode_records(extents: list[Extent]) -> bytes:
    return b"".join(RECORD.pack(e.lblk, e.pblk, e.count, 0) for e in extents)


def decode_records(buf: bytes | memoryview, count: int) -> list[Extent]:
    out = [Extent(lb, pb, n) for lb, pb, n, _ in RECORD.iter_unpack(bytes(buf[: count * 24]))]
    check_extents(out)
    return out


def check_extents(extents: list[Extent]) -> None:
    prev_end = 0
    for e in extents:
        if e.count == 0 or e.lblk < prev_end:
            raise FormatError(f"extent list unsorted, overlapping or empty at {e}")
        prev_end = e.lend


def encode_extent_block(extents: list[Extent], blkno: int, seq: int = 0) -> bytearray:
    if len(extents) > EXTENTS_PER_BLOCK:
        raise FormatError("too many extents for one block")
    buf = new_block(BlockType.EXTENT, blkno, seq)
    struct.pack_into("<II", buf, HEADER_SIZE, len(extents), 0)
    data = encode_records(extents)
    buf[HEADER_SIZE + 8 : HEADER_SIZE + 8 + len(data)] = data
    return seal(buf, BlockType.EXTENT, blkno, seq)


def decode_extent_block(buf: bytes | bytearray | memoryview, blkno: int) -> list[Extent]:
    check(buf, blkno, BlockType.EXTENT)
    (count, _) = struct.unpack_from("<II", buf, HEADER_SIZE)
    if count > EXTENTS_PER_BLOCK:
        raise FormatError(f"extent block {blkno}: count {count} too large")
    return decode_records(memoryview(buf)[HEADER_SIZE + 8 :], count)


def encode_block_list(blocks: list[int]) -> bytes:
    return struct.pack(f"<{len(blocks)}Q", *blocks)


def decode_block_list(payload: bytes) -> list[int]:
    return list(struct.unpack(f"<{len(payload) // 8}Q", payload[: len(payload) // 8 * 8]))
