"""The metadata block header every clusterfs metadata block starts with.

Layout (little-endian, 32 bytes):

    0  u32 magic     0x53464C43 ("CLFS" read as bytes)
    4  u16 type      BlockType
    6  u16 format    FORMAT_VERSION
    8  u64 blkno     the block's own address: a block written to the wrong place is caught
   16  u64 seq       generation / journal sequence / bumped on every rewrite
   24  u32 crc       crc32c of the whole block with this field zeroed
   28  u32 reserved  zero

`seal` fills in the header and the checksum; `check` verifies them. Both are pure.
"""

from __future__ import annotations

import struct
from enum import IntEnum

from clusterfs.errors import ChecksumError, FormatError
from clusterfs.native import crc32c

BLOCK_SIZE = 4096
MAGIC = 0x53464C43
FORMAT_VERSION = 2      # 2: each journal region ends with its slot's orphan block
HEADER = struct.Struct("<IHHQQII")
HEADER_SIZE = HEADER.size  # 32
_CRC_OFFSET = 24
_ZERO_CRC = bytes(4)


class BlockType(IntEnum):
    SUPER = 1
    RGRP = 2
    BITMAP = 3
    INODE = 4
    EXTENT = 5
    DIRLEAF = 6
    DIRTABLE = 7
    XATTR = 8
    JHEAD = 9
    JDESC = 10
    JCOMMIT = 11
    HEARTBEAT = 12
    ORPHAN = 13
    DISKBEAT = 14       # membership disk heartbeats (format/diskbeat.py)
    JREVOKE = 15        # journal revoke records (format/journal.py)


def block_crc(buf: bytes | bytearray | memoryview) -> int:
    """crc32c of a block with its crc field taken as zero."""
    crc = crc32c(memoryview(buf)[:_CRC_OFFSET])
    crc = crc32c(_ZERO_CRC, crc)
    return crc32c(memoryview(buf)[_CRC_OFFSET + 4 :], crc)


def seal(buf: bytearray, btype: BlockType, blkno: int, seq: int = 0) -> bytearray:
    """Write the header into buf[0:32] and the checksum over the whole block."""
    HEADER.pack_into(buf, 0, MAGIC, int(btype), FORMAT_VERSION, blkno, seq, 0, 0)
    struct.pack_into("<I", buf, _CRC_OFFSET, block_crc(buf))
    return buf


def new_block(btype: BlockType, blkno: int, seq: int = 0) -> bytearray:
    buf = bytearray(BLOCK_SIZE)
    HEADER.pack_into(buf, 0, MAGIC, int(btype), FORMAT_VERSION, blkno, seq, 0, 0)
    return buf


def header_of(buf: bytes | bytearray | memoryview) -> tuple[int, int, int, int, int, int]:
    """(magic, type, format, blkno, seq, crc)."""
    magic, btype, fmt, blkno, seq, crc, _ = HEADER.unpack_from(buf, 0)
    return magic, btype, fmt, blkno, seq, crc


def check(
    buf: bytes | bytearray | memoryview, blkno: int, btype: BlockType | None = None
) -> int:
    """Verify magic, type, own address and checksum; return the header's seq.

    Raises ChecksumError for a bad crc, FormatError for anything else.
    """
    magic, got_type, fmt, got_blkno, seq, crc = header_of(buf)
    what = btype.name.lower() if btype is not None else "metadata"
    if magic != MAGIC:
        raise FormatError(f"{what} block {blkno}: bad magic {magic:#x}")
    if block_crc(buf) != crc:
        raise ChecksumError(blkno, what)
    if btype is not None and got_type != btype:
        raise FormatError(f"{what} block {blkno}: wrong type {got_type}")
    if fmt != FORMAT_VERSION:
        raise FormatError(f"{what} block {blkno}: unknown format version {fmt}")
    if got_blkno != blkno:
        raise FormatError(f"{what} block {blkno}: claims to be block {got_blkno}")
    return seq


def block_type(buf: bytes | bytearray | memoryview) -> int | None:
    """The type of a block that has our magic, else None (no checksum check)."""
    magic, btype, *_ = HEADER.unpack_from(buf, 0)
    return btype if magic == MAGIC else None
