"""Directories: linear (stuffed in the inode) while small, hashed when large.

Linear entry (in the inode payload):  u64 ino, u8 dtype, u8 name length, name.
Hashed directories use extendible hashing (as GFS2): the inode payload lists the
hash-table blocks; the table holds 2**depth u64 leaf addresses (TABLE_PER_BLOCK per
block); entry hash h goes to table slot h >> (32 - depth). A leaf holds entries
whose hashes share its top `local depth` bits; a full leaf splits in two (the
table doubles first if its local depth equals the table depth). At MAX_DEPTH a
full leaf chains to a new leaf through `next` instead.

Leaf block: header, u16 local depth, u16 count, u16 bytes used, u16 pad, u64 next,
then entries: u32 hash, u64 ino, u8 dtype, u8 name length, name.
Table block: header, then TABLE_PER_BLOCK u64 leaf addresses.
The name hash is crc32c of the name bytes.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from clusterfs.errors import FormatError
from clusterfs.format.block import BLOCK_SIZE, HEADER_SIZE, BlockType, check, new_block, seal
from clusterfs.native import crc32c

NAME_MAX = 255
LINEAR_ENTRY = struct.Struct("<QBB")
LEAF_ENTRY = struct.Struct("<IQBB")
LEAF_HEADER = struct.Struct("<HHHHQ")
LEAF_DATA_OFFSET = HEADER_SIZE + LEAF_HEADER.size     # 48
LEAF_CAPACITY = BLOCK_SIZE - LEAF_DATA_OFFSET          # 4048 bytes of entries
TABLE_PER_BLOCK = (BLOCK_SIZE - HEADER_SIZE) // 8      # 508
MAX_DEPTH = 17
HASHED_HEADER = struct.Struct("<BBHI")


class DirEntry(NamedTuple):
    name: bytes
    ino: int
    dtype: int


def name_hash(name: bytes) -> int:
    return crc32c(name)


def leaf_entry_size(name: bytes) -> int:
    return LEAF_ENTRY.size + len(name)


def encode_linear(entries: list[DirEntry]) -> bytes:
    return b"".join(LINEAR_ENTRY.pack(e.ino, e.dtype, len(e.name)) + e.name for e in entries)


def linear_size(entries_bytes: int, name: bytes) -> int:
    return entries_bytes + LINEAR_ENTRY.size + len(name)


def decode_linear(payload: bytes) -> list[DirEntry]:
    out, pos = [], 0
    while pos < len(payload):
        if pos + LINEAR_ENTRY.size > len(payload):
            raise FormatError("linear directory entry truncated")
        ino, dtype, nlen = LINEAR_ENTRY.unpack_from(payload, pos)
        pos += LINEAR_ENTRY.size
        name = payload[pos : pos + nlen]
        if len(name) != nlen or nlen == 0 or b"/" in name or b"\0" in name:
            raise FormatError(f"linear directory entry with bad name {name!r}")
        out.append(DirEntry(name, ino, dtype))
        pos += nlen
    return out


def leaf_record(name: bytes, ino: int, dtype: int, hash_: int | None = None) -> bytes:
    """One entry as a leaf stores it: u32 hash, u64 ino, u8 dtype, u8 namelen, name
    (hash_: the name's hash, known already)."""
    h = name_hash(name) if hash_ is None else hash_
    return LEAF_ENTRY.pack(h, ino, dtype, len(name)) + name


def record_hash(record: bytes) -> int:
    """The name hash a leaf record carries."""
    return int.from_bytes(record[:4], "little")


def encode_leaf(entries: list[DirEntry], depth: int, next_leaf: int, blkno: int,
                seq: int = 0) -> bytearray:
    return encode_leaf_records([leaf_record(e.name, e.ino, e.dtype) for e in entries],
                               depth, next_leaf, blkno, seq)


def encode_leaf_records(records: list[bytes], depth: int, next_leaf: int, blkno: int,
                        seq: int = 0) -> bytearray:
    """A leaf from its entries already packed (leaf_record)."""
    data = b"".join(records)
    if len(data) > LEAF_CAPACITY:
        raise FormatError(f"directory leaf {blkno} overflows ({len(data)} bytes)")
    buf = new_block(BlockType.DIRLEAF, blkno, seq)
    LEAF_HEADER.pack_into(buf, HEADER_SIZE, depth, len(records), len(data), 0, next_leaf)
    buf[LEAF_DATA_OFFSET : LEAF_DATA_OFFSET + len(data)] = data
    return seal(buf, BlockType.DIRLEAF, blkno, seq)


def decode_leaf(buf: bytes | bytearray | memoryview, blkno: int) -> tuple[int, int, list[DirEntry]]:
    """(local depth, next leaf, entries); checks every entry's hash."""
    depth, next_leaf, records = decode_leaf_records(buf, blkno)
    return depth, next_leaf, [entry for entry, _record in records]


def decode_leaf_records(buf: bytes | bytearray | memoryview, blkno: int
                        ) -> tuple[int, int, list[tuple[DirEntry, bytes]]]:
    """(local depth, next leaf, each entry with its record as stored); checks every
    entry's hash."""
    check(buf, blkno, BlockType.DIRLEAF)
    depth, count, used, _, next_leaf = LEAF_HEADER.unpack_from(buf, HEADER_SIZE)
    if used > LEAF_CAPACITY or depth > MAX_DEPTH:
        raise FormatError(f"directory leaf {blkno}: bad header")
    data = bytes(buf[LEAF_DATA_OFFSET : LEAF_DATA_OFFSET + used])
    out, pos = [], 0
    for _ in range(count):
        if pos + LEAF_ENTRY.size > used:
            raise FormatError(f"directory leaf {blkno}: entry truncated")
        start = pos
        h, ino, dtype, nlen = LEAF_ENTRY.unpack_from(data, pos)
        pos += LEAF_ENTRY.size
        name = data[pos : pos + nlen]
        pos += nlen
        if len(name) != nlen or nlen == 0 or name_hash(name) != h:
            raise FormatError(f"directory leaf {blkno}: bad entry {name!r}")
        out.append((DirEntry(name, ino, dtype), data[start:pos]))
    return depth, next_leaf, out


def encode_table_block(pointers: list[int], blkno: int, seq: int = 0) -> bytearray:
    if len(pointers) > TABLE_PER_BLOCK:
        raise FormatError("too many pointers for one table block")
    buf = new_block(BlockType.DIRTABLE, blkno, seq)
    struct.pack_into(f"<{len(pointers)}Q", buf, HEADER_SIZE, *pointers)
    return seal(buf, BlockType.DIRTABLE, blkno, seq)


def decode_table_block(buf: bytes | bytearray | memoryview, blkno: int, count: int) -> list[int]:
    check(buf, blkno, BlockType.DIRTABLE)
    return list(struct.unpack_from(f"<{count}Q", buf, HEADER_SIZE))


def table_blocks_for(depth: int) -> int:
    return -(-(1 << depth) // TABLE_PER_BLOCK)


def encode_hashed_payload(depth: int, table_blocks: list[int]) -> bytes:
    return HASHED_HEADER.pack(depth, 0, len(table_blocks), 0) + struct.pack(
        f"<{len(table_blocks)}Q", *table_blocks)


def decode_hashed_payload(payload: bytes) -> tuple[int, list[int]]:
    depth, _, ntable, _ = HASHED_HEADER.unpack_from(payload, 0)
    if depth > MAX_DEPTH or ntable != table_blocks_for(depth):
        raise FormatError(f"hashed directory: depth {depth} with {ntable} table blocks")
    blocks = list(struct.unpack_from(f"<{ntable}Q", payload, HASHED_HEADER.size))
    return depth, blocks


def table_slot(h: int, depth: int) -> int:
    return h >> (32 - depth) if depth else 0
