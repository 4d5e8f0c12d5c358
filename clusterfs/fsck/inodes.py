"""Checking one inode: its type, data map, extents, sizes and block count.

The walk (walk.py) has already decoded the inode block (checksum, type,
address, map flags) and claimed it. Here every block the inode owns is
claimed in the block map: extent blocks, data extents, the xattr block, a
directory's leaves and table blocks. `blocks` must count exactly those plus
the inode itself (docs/format.md).
"""

from __future__ import annotations

import stat
import struct
from dataclasses import dataclass

from clusterfs.errors import ClusterFSError
from clusterfs.format.block import BLOCK_SIZE, HEADER_SIZE, BlockType, check
from clusterfs.format.extent import EXTENTS_PER_BLOCK, RECORD, Extent
from clusterfs.format.inode import (
    F_DIR_HASHED,
    F_EXTBLOCKS,
    F_EXTENTS,
    F_STUFFED,
    MAP_FLAGS,
    Inode,
    decode_xattr_block,
)
from clusterfs.fsck.context import Context
from clusterfs.fsck.directory import DirContents, read_directory

_TYPES = {
    stat.S_IFREG: "regular file", stat.S_IFDIR: "directory", stat.S_IFLNK: "symlink",
    stat.S_IFCHR: "character device", stat.S_IFBLK: "block device", stat.S_IFIFO: "fifo",
    stat.S_IFSOCK: "socket",
}
_MAPS = {
    stat.S_IFREG: {F_STUFFED, F_EXTENTS, F_EXTBLOCKS},
    stat.S_IFDIR: {F_STUFFED, F_DIR_HASHED},
    stat.S_IFLNK: {F_STUFFED, F_EXTENTS, F_EXTBLOCKS},    # long targets live in a data block
}


@dataclass
class Checked:
    owned: int                    # blocks the inode owns, itself included
    directory: DirContents | None


def check_inode(ctx: Context, inode: Inode) -> Checked:
    where = f"inode {inode.ino}"
    ftype = stat.S_IFMT(inode.mode)
    kind = inode.flags & MAP_FLAGS
    if ftype not in _TYPES:
        ctx.report.error(where, f"bad file type in mode {inode.mode:#o}")
        ctx.incomplete = True      # its data map cannot be trusted, nor what it owns
        return Checked(1, None)
    if kind not in _MAPS.get(ftype, {F_STUFFED}):
        ctx.report.error(where, f"{_TYPES[ftype]} with data-map flags {inode.flags:#x}")
        ctx.incomplete = True
        return Checked(1, None)
    owned = 1 + _check_xattr_block(ctx, inode)
    directory = None
    if ftype == stat.S_IFDIR:
        directory = read_directory(ctx, inode)
        owned += directory.blocks
        _check_dir_size(ctx, inode, directory)
    elif kind == F_STUFFED:
        _check_stuffed_size(ctx, inode, ftype)
    else:
        owned += _check_extents(ctx, inode, kind)
        if ftype == stat.S_IFLNK and not 0 < inode.size < BLOCK_SIZE:
            ctx.report.error(where, f"symlink target of {inode.size} bytes")
    if inode.blocks != owned:
        p = ctx.report.error(where, f"block count {inode.blocks}, owns {owned} blocks",
                             fixable=True)
        ctx.fix_inode(inode.ino, "blocks", owned, p)
    return Checked(owned, directory)


def _check_xattr_block(ctx: Context, inode: Inode) -> int:
    blk = inode.xattr_blk
    if not blk:
        return 0
    why = ctx.placement_problem(blk, 1) or ctx.claim(blk, 1, inode.ino, "xattr block")
    if why is None:
        try:
            decode_xattr_block(ctx.reader.read(blk), blk)
        except ClusterFSError as exc:
            why = str(exc)
    if why is not None:
        ctx.report.error(f"inode {inode.ino}", f"xattr block {blk}: {why}")
    return 1


def _check_dir_size(ctx: Context, inode: Inode, directory: DirContents) -> None:
    if inode.size != directory.size and directory.complete:
        p = ctx.report.error(f"inode {inode.ino}", f"directory size {inode.size}, should be "
                                                   f"{directory.size}", fixable=True)
        ctx.fix_inode(inode.ino, "size", directory.size, p)


def _check_stuffed_size(ctx: Context, inode: Inode, ftype: int) -> None:
    where = f"inode {inode.ino}"
    n = len(inode.payload)
    if ftype in (stat.S_IFREG, stat.S_IFLNK):
        if inode.size != n:
            ctx.report.error(where, f"{_TYPES[ftype]} of size {inode.size} holds {n} "
                                    "stuffed bytes")
        if ftype == stat.S_IFLNK and n == 0:
            ctx.report.error(where, "symlink with an empty target")
    elif inode.size or n:
        ctx.report.error(where, f"{_TYPES[ftype]} with size {inode.size} and {n} bytes of data")


def _check_extents(ctx: Context, inode: Inode, kind: int) -> int:
    """Claim and check every extent; return data blocks + extent blocks."""
    if kind == F_EXTENTS:
        extents, map_blocks = _records(ctx, inode, inode.payload, "inline extents"), 0
    else:
        extents, map_blocks = _extent_blocks(ctx, inode)
    where = f"inode {inode.ino}"
    prev_end = 0
    for e in extents:
        run = f"extent {e.lblk}+{e.count} -> {e.pblk}"
        if e.count == 0:
            ctx.report.error(where, f"{run}: empty")
            continue
        if e.lblk < prev_end:
            ctx.report.error(where, f"{run}: overlaps the previous extent (ends at {prev_end})")
        prev_end = max(prev_end, e.lend)
        why = ctx.placement_problem(e.pblk, e.count)
        if why is not None:
            ctx.incomplete = True   # what this run really covers is unknown
        else:
            why = ctx.claim(e.pblk, e.count, inode.ino, "data")
        if why is not None:
            ctx.report.error(where, f"{run}: {why}")
    eof_blocks = -(-inode.size // BLOCK_SIZE)
    if prev_end > eof_blocks:
        ctx.report.error(where, f"blocks mapped up to logical {prev_end - 1}, past the end "
                                f"of the file (size {inode.size})")
    return sum(e.count for e in extents) + map_blocks


def _records(ctx: Context, inode: Inode, raw: bytes | memoryview, what: str) -> list[Extent]:
    if len(raw) % RECORD.size:
        ctx.report.error(f"inode {inode.ino}", f"{what}: {len(raw)} bytes is not whole records")
    whole = len(raw) // RECORD.size * RECORD.size
    return [Extent(lb, pb, n) for lb, pb, n, _ in RECORD.iter_unpack(bytes(raw[:whole]))]


def _extent_blocks(ctx: Context, inode: Inode) -> tuple[list[Extent], int]:
    where = f"inode {inode.ino}"
    if len(inode.payload) % 8:
        ctx.report.error(where, f"extent block list of {len(inode.payload)} bytes")
    blocks = list(struct.unpack(f"<{len(inode.payload) // 8}Q",
                                inode.payload[: len(inode.payload) // 8 * 8]))
    extents: list[Extent] = []
    for blk in blocks:
        why = ctx.placement_problem(blk, 1) or ctx.claim(blk, 1, inode.ino, "extent block")
        if why is None:
            try:
                extents += _read_extent_block(ctx, inode, blk)
                continue
            except ClusterFSError as exc:
                why = str(exc)
        ctx.report.error(where, f"extent block {blk}: {why}")
        ctx.incomplete = True
    return extents, len(blocks)


def _read_extent_block(ctx: Context, inode: Inode, blk: int) -> list[Extent]:
    buf = ctx.reader.read(blk)
    check(buf, blk, BlockType.EXTENT)
    (count,) = struct.unpack_from("<I", buf, HEADER_SIZE)
    if count > EXTENTS_PER_BLOCK:
        ctx.report.error(f"inode {inode.ino}", f"extent block {blk}: count {count} too large")
        count = EXTENTS_PER_BLOCK
    start = HEADER_SIZE + 8
    return _records(ctx, inode, memoryview(buf)[start : start + count * RECORD.size],
                    f"extent block {blk}")
