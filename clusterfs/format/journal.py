"""Journal blocks. Each node slot owns a journal region of `journal_blocks` blocks.

Block 0 of the region is the journal header (JHEAD): u32 slot, u32 flags,
u64 tail sequence, u64 tail offset (where replay starts, 1..journal_blocks-2).
The last block is the slot's orphan block (format/orphan.py); the blocks between
are a circular log of transactions:

    JDESC(seq)  u32 count, u32 pad, then count u64 home addresses
    count full copies of the metadata blocks (each carries its own header)
    ... more JDESC + copies of the same seq for big transactions ...
    JREVOKE(seq) u32 count, u32 pad, then count u64 home addresses (none or more)
    JCOMMIT(seq) u32 nblocks (descriptors + copies + revoke blocks), u32 crc32c
                 over all of them in log order, u64 commit time (ns)

A revoke record says that the copies of those blocks logged by earlier
transactions must not be replayed: the node wrote them home and gave up the lock
that covers them, so another node may have written a newer copy since (as jbd2's
and GFS2's revokes). Replay walks from the tail while sequence numbers follow on
and checksums verify, collecting revokes, then writes each copy home that no
later transaction revoked; a transaction without a valid commit ends the log.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from clusterfs.format.block import BLOCK_SIZE, HEADER_SIZE, BlockType, check, new_block, seal

JHEAD_FIELDS = struct.Struct("<IIQQ")
DESC_FIELDS = struct.Struct("<II")
COMMIT_FIELDS = struct.Struct("<IIQ")
TARGETS_PER_DESC = (BLOCK_SIZE - HEADER_SIZE - DESC_FIELDS.size) // 8   # 507
JF_CLEAN = 0x1     # unmounted cleanly: nothing to replay


@dataclass
class JournalHeader:
    slot: int
    tail_seq: int
    tail_off: int
    flags: int = 0


def encode_jhead(h: JournalHeader, blkno: int) -> bytearray:
    buf = new_block(BlockType.JHEAD, blkno, h.tail_seq)
    JHEAD_FIELDS.pack_into(buf, HEADER_SIZE, h.slot, h.flags, h.tail_seq, h.tail_off)
    return seal(buf, BlockType.JHEAD, blkno, h.tail_seq)


def decode_jhead(buf: bytes | bytearray | memoryview, blkno: int) -> JournalHeader:
    check(buf, blkno, BlockType.JHEAD)
    slot, flags, seq, off = JHEAD_FIELDS.unpack_from(buf, HEADER_SIZE)
    return JournalHeader(slot, seq, off, flags)


def _encode_homes(btype: BlockType, homes: list[int], blkno: int, seq: int) -> bytearray:
    """A block listing home addresses (a descriptor or a revoke record: one layout)."""
    buf = new_block(btype, blkno, seq)
    DESC_FIELDS.pack_into(buf, HEADER_SIZE, len(homes), 0)
    struct.pack_into(f"<{len(homes)}Q", buf, HEADER_SIZE + DESC_FIELDS.size, *homes)
    return seal(buf, btype, blkno, seq)


def _decode_homes(btype: BlockType, buf: bytes | bytearray | memoryview, blkno: int
                  ) -> tuple[int, list[int]]:
    seq = check(buf, blkno, btype)
    count, _ = DESC_FIELDS.unpack_from(buf, HEADER_SIZE)
    count = min(count, TARGETS_PER_DESC)
    return seq, list(struct.unpack_from(f"<{count}Q", buf, HEADER_SIZE + DESC_FIELDS.size))


def encode_descriptor(targets: list[int], blkno: int, seq: int) -> bytearray:
    return _encode_homes(BlockType.JDESC, targets, blkno, seq)


def decode_descriptor(buf: bytes | bytearray | memoryview, blkno: int) -> tuple[int, list[int]]:
    """(seq, home addresses)."""
    return _decode_homes(BlockType.JDESC, buf, blkno)


def encode_revoke(homes: list[int], blkno: int, seq: int) -> bytearray:
    return _encode_homes(BlockType.JREVOKE, homes, blkno, seq)


def decode_revoke(buf: bytes | bytearray | memoryview, blkno: int) -> tuple[int, list[int]]:
    """(seq, revoked home addresses)."""
    return _decode_homes(BlockType.JREVOKE, buf, blkno)


def encode_commit(nblocks: int, crc: int, when_ns: int, blkno: int, seq: int) -> bytearray:
    buf = new_block(BlockType.JCOMMIT, blkno, seq)
    COMMIT_FIELDS.pack_into(buf, HEADER_SIZE, nblocks, crc, when_ns)
    return seal(buf, BlockType.JCOMMIT, blkno, seq)


def decode_commit(buf: bytes | bytearray | memoryview, blkno: int) -> tuple[int, int, int]:
    """(seq, nblocks, crc)."""
    seq = check(buf, blkno, BlockType.JCOMMIT)
    nblocks, crc, _ = COMMIT_FIELDS.unpack_from(buf, HEADER_SIZE)
    return seq, nblocks, crc
