"""Inodes: one block each; the inode number is the block address.

After the 32-byte block header come the fixed fields (INODE_FIELDS), then a
3952-byte area: inline xattrs (at most XATTR_INLINE_MAX bytes) followed by the
data-map payload (at most PAYLOAD_MAX bytes). What the payload holds depends on
the flags:

    STUFFED     file bytes / symlink target / directory entries (linear dir)
    EXTENTS     inline extent records (see clusterfs.format.extent)
    EXTBLOCKS   a list of u64 extent-block addresses (the records live there)
    DIR_HASHED  a hashed directory: u8 depth, u8 pad, u16 ntable, u32 pad,
                then ntable u64 hash-table block addresses
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from clusterfs.errors import FormatError
from clusterfs.format.block import BLOCK_SIZE, HEADER_SIZE, BlockType, check, new_block, seal

INODE_FIELDS = struct.Struct("<IIIIIIQQQQQQqqqIIIHH")
AREA_OFFSET = 160
AREA_SIZE = BLOCK_SIZE - AREA_OFFSET          # 3936
XATTR_INLINE_MAX = 1008
PAYLOAD_MAX = AREA_SIZE - XATTR_INLINE_MAX     # 2928: stuffed data and inline maps
XATTR_BLOCK_MAX = BLOCK_SIZE - HEADER_SIZE     # 4064

F_STUFFED = 0x1
F_EXTENTS = 0x2
F_EXTBLOCKS = 0x4
F_DIR_HASHED = 0x8
MAP_FLAGS = F_STUFFED | F_EXTENTS | F_EXTBLOCKS | F_DIR_HASHED

assert HEADER_SIZE + INODE_FIELDS.size <= AREA_OFFSET


@dataclass
class Inode:
    ino: int
    mode: int
    uid: int = 0
    gid: int = 0
    nlink: int = 1
    flags: int = F_STUFFED
    size: int = 0
    blocks: int = 1          # blocks owned: inode + data + map + xattr blocks
    rdev: int = 0
    generation: int = 0
    parent: int = 0          # a directory's parent (for fsck); 0 for others
    xattr_blk: int = 0
    atime: int = 0           # seconds
    mtime: int = 0
    ctime: int = 0
    atime_ns: int = 0        # nanoseconds part
    mtime_ns: int = 0
    ctime_ns: int = 0
    xattrs: dict[bytes, bytes] = field(default_factory=dict)
    payload: bytes = b""
    seq: int = 0


def encode_xattrs(xattrs: dict[bytes, bytes]) -> bytes:
    """u16 count, then per entry u8 name length, u16 value length, name, value."""
    out = [struct.pack("<H", len(xattrs))]
    for name, value in sorted(xattrs.items()):
        out.append(struct.pack("<BH", len(name), len(value)) + name + value)
    return b"".join(out)


def decode_xattrs(buf: bytes | memoryview) -> dict[bytes, bytes]:
    buf = bytes(buf)
    if len(buf) < 2:
        return {}
    (count,) = struct.unpack_from("<H", buf, 0)
    pos, out = 2, {}
    for _ in range(count):
        if pos + 3 > len(buf):
            raise FormatError("xattr area truncated")
        nlen, vlen = struct.unpack_from("<BH", buf, pos)
        pos += 3
        if pos + nlen + vlen > len(buf):
            raise FormatError("xattr entry runs past its area")
        out[buf[pos : pos + nlen]] = buf[pos + nlen : pos + nlen + vlen]
        pos += nlen + vlen
    return out


def encode_inode(inode: Inode, xattr_inline: bytes | None = None) -> bytearray:
    """Encode an inode. xattr_inline: the encoded inline xattrs ("" when they live in
    inode.xattr_blk); None means encode inode.xattrs inline."""
    xa = encode_xattrs(inode.xattrs) if xattr_inline is None else xattr_inline
    if len(xa) > XATTR_INLINE_MAX:
        raise FormatError(f"inode {inode.ino}: inline xattrs too large ({len(xa)})")
    if len(inode.payload) > PAYLOAD_MAX:
        raise FormatError(f"inode {inode.ino}: payload too large ({len(inode.payload)})")
    buf = new_block(BlockType.INODE, inode.ino, inode.seq)
    INODE_FIELDS.pack_into(
        buf, HEADER_SIZE, inode.mode, inode.uid, inode.gid, inode.nlink, inode.flags, 0,
        inode.size, inode.blocks, inode.rdev, inode.generation, inode.parent, inode.xattr_blk,
        inode.atime, inode.mtime, inode.ctime, inode.atime_ns, inode.mtime_ns, inode.ctime_ns,
        len(xa), len(inode.payload),
    )
    buf[AREA_OFFSET : AREA_OFFSET + len(xa)] = xa
    start = AREA_OFFSET + len(xa)
    buf[start : start + len(inode.payload)] = inode.payload
    return seal(buf, BlockType.INODE, inode.ino, inode.seq)


def decode_inode(buf: bytes | bytearray | memoryview, ino: int) -> Inode:
    """Decode an inode block. Overflow xattrs (xattr_blk) are not read here."""
    seq = check(buf, ino, BlockType.INODE)
    (mode, uid, gid, nlink, flags, _pad, size, blocks, rdev, gen, parent, xblk,
     at, mt, ct, atn, mtn, ctn, xlen, plen) = INODE_FIELDS.unpack_from(buf, HEADER_SIZE)
    if xlen > XATTR_INLINE_MAX or plen > PAYLOAD_MAX:
        raise FormatError(f"inode {ino}: area lengths {xlen}/{plen} out of range")
    if (flags & MAP_FLAGS).bit_count() != 1:
        raise FormatError(f"inode {ino}: bad data-map flags {flags:#x}")
    if max(atn, mtn, ctn) >= 1_000_000_000:
        raise FormatError(f"inode {ino}: nanoseconds out of range")
    area = memoryview(buf)[AREA_OFFSET:]
    return Inode(
        ino=ino, mode=mode, uid=uid, gid=gid, nlink=nlink, flags=flags, size=size,
        blocks=blocks, rdev=rdev, generation=gen, parent=parent, xattr_blk=xblk,
        atime=at, mtime=mt, ctime=ct, atime_ns=atn, mtime_ns=mtn, ctime_ns=ctn,
        xattrs=decode_xattrs(area[:xlen]) if xlen else {},
        payload=bytes(area[xlen : xlen + plen]), seq=seq,
    )


def encode_xattr_block(xattrs: dict[bytes, bytes], blkno: int, seq: int = 0) -> bytearray:
    data = encode_xattrs(xattrs)
    if len(data) > XATTR_BLOCK_MAX:
        raise FormatError(f"xattrs too large for one block ({len(data)})")
    buf = new_block(BlockType.XATTR, blkno, seq)
    buf[HEADER_SIZE : HEADER_SIZE + len(data)] = data
    return seal(buf, BlockType.XATTR, blkno, seq)


def decode_xattr_block(buf: bytes | bytearray | memoryview, blkno: int) -> dict[bytes, bytes]:
    check(buf, blkno, BlockType.XATTR)
    return decode_xattrs(memoryview(buf)[HEADER_SIZE:])
